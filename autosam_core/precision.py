"""Device and numeric precision: where AutoSAM runs and in which dtype its matrix products run.

``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16``. Mixed precision here means
``torch.autocast`` around g, the SAM image encoder and the SAM mask decoder, while master weights,
optimizer state and the loss stay float32 (Micikevicius et al. 2018, "Mixed Precision Training").
``auto`` picks bf16 where the hardware computes it fast (a CPU with AMX-BF16 or AVX512-BF16, a CUDA
GPU with compute capability >= 8.0), else fp32. fp16 is CUDA-only and needs a gradient scaler
(:func:`grad_scaler`).

Measured on this project's 2-core Sapphire Rapids CPU (LiteMedSAM encoder, 2 threads, batch 4):
2.0-2.4 s per image in fp32, 1.0-1.1 s in bf16; box-prompted Dice on 12 Kvasir images 88.7 (fp32
embeddings) vs 88.4 (bf16 embeddings).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a :class:`torch.device`.

    Raises:
        ValueError: an unknown device string, or CUDA asked for where none is available (the message
            names what was asked and what exists).
    """
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} was asked for but no CUDA GPU is available here; use 'cpu' or 'auto'")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return dev
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; found {text!r}")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises bfloat16 matrix units (``amx_bf16`` or ``avx512_bf16`` in
    /proc/cpuinfo, Linux); False elsewhere or when the flags cannot be read."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def prefers_channels_last(device: torch.device, precision: str) -> bool:
    """Whether g should train in channels_last (NHWC) memory format on ``device`` in ``precision``.

    True on a CPU with AVX-512 (``avx512f`` in /proc/cpuinfo) and on CUDA in bf16/fp16; False on a
    CPU without AVX-512 and on CUDA in fp32. Same values either way; only speed differs. Measured
    (issue 9), training step of g + LiteMedSAM's decoder, seconds, contiguous vs channels_last:

    - Sapphire Rapids 2-core (AVX-512, AMX): ``sam_head`` g forward + backward 1.2x faster in NHWC in
      fp32, 1.6x in bf16 (:meth:`AutoSam.set_channels_last`);
    - AMD EPYC 2-core with AVX-512 BF16: ``paper`` g step, batch 10, fp32 10.15 vs 9.07 (session 13);
    - AMD EPYC 2-core with AVX2 only: ``sam_head`` step, batch 4, one thread, fp32 2.86 vs 3.27, a demo
      site's local epoch 21.2-22.1 vs 23.7-26.0 s; ``paper`` step 7.15 vs 7.06 (session 14);
    - NVIDIA H200: ``paper`` step, batch 10, fp32 0.080 vs 0.096, bf16 0.104 vs 0.101 (session 11).
    """
    if device.type == "cuda":
        return precision in _DTYPES
    return "avx512f" in _cpu_flags()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for ``device``; explicit choices are checked.

    Raises:
        ValueError: unknown precision; fp16 asked for on a CPU (no gradient scaler support there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; found {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on a CPU use bf16 or fp32)")
    return precision


def autocast(device: torch.device, precision: str):
    """Context manager: ``torch.autocast`` for bf16/fp16 on ``device``; a no-op for fp32."""
    if precision in _DTYPES:
        return torch.autocast(device.type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on CUDA (bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
