"""Wire dtype of the trainable state: g's floating-point arrays travel in float32, bfloat16 or float16.

A federation's ``transfer_dtype`` (issue 9) halves the bytes per round with a 16-bit type. Integer
buffers (BatchNorm's ``num_batches_tracked``, int64) always travel unchanged. bfloat16 has no NumPy
dtype (what Flower's arrays are built on), so a bfloat16 tensor travels as its raw 16-bit pattern
viewed as int16: the receiver, who knows the federation's ``transfer_dtype``, views it back. The
trainable state never holds int16 tensors of its own, so the encoding is unambiguous. Aggregation
and training always run on float32 copies (:func:`decode_state`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

TRANSFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check(transfer_dtype: str) -> torch.dtype:
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer_dtype must be one of {', '.join(TRANSFER_DTYPES)}; found {transfer_dtype!r}")
    return TRANSFER_DTYPES[transfer_dtype]


def encode_state(state: Mapping[str, torch.Tensor], transfer_dtype: str = "float32") -> "OrderedDict[str, torch.Tensor]":
    """Trainable state -> the tensors that travel: floating tensors cast to ``transfer_dtype``
    (bfloat16 as its int16 bit pattern), everything else unchanged; CPU, contiguous.

    Raises:
        ValueError: unknown ``transfer_dtype``.
    """
    dtype = _check(transfer_dtype)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
            if dtype == torch.bfloat16:
                t = t.view(torch.int16)
        out[key] = t.contiguous()
    return out


def decode_state(state: Mapping[str, torch.Tensor], transfer_dtype: str = "float32") -> "OrderedDict[str, torch.Tensor]":
    """Received tensors -> float32 floating tensors (integer buffers unchanged), for loading or averaging.

    Raises:
        ValueError: unknown ``transfer_dtype``; an int16 tensor when ``transfer_dtype`` is not bfloat16.
    """
    dtype = _check(transfer_dtype)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        t = torch.as_tensor(value)
        if t.dtype == torch.int16:
            if dtype != torch.bfloat16:
                raise ValueError(f"array {key!r} arrived as int16 but the federation's transfer_dtype is "
                                 f"{transfer_dtype}, not bfloat16")
            t = t.view(torch.bfloat16)
        out[key] = t.float() if t.is_floating_point() else t
    return out

