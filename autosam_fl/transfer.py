"""The dtype g's state travels in between the server and the sites (``transfer_dtype``, issue 9).

The global model and the server's average stay float32; only what crosses the network is narrowed.
Floating-point arrays travel as

- ``float32``: unchanged (the default);
- ``float16``: NumPy float16 (IEEE half: 10-bit mantissa, max 65504; larger values become inf and the
  reply is rejected as non-finite);
- ``bfloat16``: NumPy has no bfloat16 dtype, so the 16 upper bits of each float32 travel as uint16,
  rounded to nearest even (the same rounding as ``torch.Tensor.to(torch.bfloat16)``). bfloat16 keeps
  float32's 8-bit exponent (no overflow) with 7 stored mantissa bits (relative rounding error <= 2**-8).

Integer arrays (BatchNorm's ``num_batches_tracked``, int64) always travel unchanged. The receiver
decodes every floating-point array back to float32 before loading or averaging, so each side sees the
same keys, shapes and dtypes as without narrowing. Both directions use the dtype named in the
instruction's ``transfer-dtype`` (:data:`autosam_fl.protocol.TRANSFER_DTYPE`).

No flwr import: the client and the server both use this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

TRANSFER_DTYPES = ("float32", "bfloat16", "float16")

#: NumPy dtype each transfer dtype occupies on the wire (bfloat16: its bits in a uint16).
WIRE_DTYPE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}


class TransferDtypeError(ValueError):
    """An array on the wire is not in the dtype the federation's ``transfer_dtype`` says."""


def check_transfer_dtype(name: str) -> str:
    """``name`` if it is one of :data:`TRANSFER_DTYPES`, else :class:`TransferDtypeError` naming them."""
    if name not in TRANSFER_DTYPES:
        raise TransferDtypeError(f"transfer_dtype must be one of {list(TRANSFER_DTYPES)}, found {name!r}")
    return name


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 array of bfloat16 bit patterns, same shape, rounded to nearest even.

    NaN stays NaN (quiet), +-inf stays +-inf; finite values above bfloat16's max round to inf.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep the sign, force a quiet NaN
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 array (exact: every bfloat16 is a float32)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _is_float(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # flwr Array
        return value.numpy()
    return np.asarray(value)


def encode_state(state: Mapping[str, Any], transfer_dtype: str) -> dict[str, np.ndarray]:
    """g's state -> what goes on the wire.

    Args:
        state: key -> float32/float64 or integer array (torch tensors, NumPy arrays or Flower Arrays).
        transfer_dtype: one of :data:`TRANSFER_DTYPES`.

    Returns:
        key -> NumPy array, same keys/order/shapes: floating arrays in :data:`WIRE_DTYPE`
        [transfer_dtype], integer arrays unchanged.

    Raises:
        TransferDtypeError: unknown ``transfer_dtype``.
    """
    check_transfer_dtype(transfer_dtype)
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        arr = _as_numpy(value)
        if _is_float(arr):
            if transfer_dtype == "bfloat16":
                arr = float32_to_bfloat16_bits(arr)
            else:
                arr = np.ascontiguousarray(arr, dtype=WIRE_DTYPE[transfer_dtype])
        out[key] = arr
    return out


def decode_state(arrays: Mapping[str, Any], transfer_dtype: str,
                 reference: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """What came off the wire -> key -> float32 (floating) / unchanged (integer) NumPy arrays.

    Args:
        arrays: key -> NumPy array / Flower Array as sent by :func:`encode_state`.
        transfer_dtype: the federation's transfer dtype (both directions use the same one).
        reference: optional key -> array of the float32 state the arrays stand for; when given, a
            key is decoded as floating exactly when the reference's array is floating, so an integer
            buffer sent in a float dtype (or a float sent as an integer) is an error. Keys absent from
            the reference are decoded by their own dtype (the caller's structure check reports them).

    Raises:
        TransferDtypeError: a floating array is not in the wire dtype of ``transfer_dtype`` (message
        names the key, the expected and the found dtype), or ``transfer_dtype`` is unknown.
    """
    check_transfer_dtype(transfer_dtype)
    wire = WIRE_DTYPE[transfer_dtype]
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        arr = _as_numpy(value)
        ref = reference.get(key) if reference is not None else None
        floating = _is_float(_as_numpy(ref)) if ref is not None else (
            _is_float(arr) or (transfer_dtype == "bfloat16" and arr.dtype == np.uint16))
        if not floating:
            if _is_float(arr) or (ref is not None and arr.dtype != _as_numpy(ref).dtype):
                want = _as_numpy(ref).dtype if ref is not None else "an integer dtype"
                raise TransferDtypeError(f"array {key!r}: expected {want} (integer buffers travel unchanged), "
                                         f"found {arr.dtype}")
            out[key] = arr
            continue
        if arr.dtype != wire:
            shown = "uint16 (bfloat16 bits)" if transfer_dtype == "bfloat16" else str(wire)
            raise TransferDtypeError(f"array {key!r}: transfer_dtype is {transfer_dtype}, so it must travel as "
                                     f"{shown}; found {arr.dtype}")
        out[key] = bfloat16_bits_to_float32(arr) if transfer_dtype == "bfloat16" else arr.astype(np.float32)
    return out


def wire_signature(signature: Mapping[str, tuple[tuple[int, ...], str]], transfer_dtype: str
                   ) -> dict[str, tuple[tuple[int, ...], str]]:
    """A float32 state's {key: (shape, dtype name)} as it looks on the wire (the reply audit's rule)."""
    check_transfer_dtype(transfer_dtype)
    wire = str(WIRE_DTYPE[transfer_dtype])
    return {k: (shape, wire if np.issubdtype(np.dtype(dt), np.floating) else dt)
            for k, (shape, dt) in signature.items()}
