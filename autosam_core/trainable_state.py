"""What a trainable state is, and the one comparison of two of them (keys, shapes, dtypes).

The trainable state is g's (and h's) state dict under the prefixes :data:`TRAINABLE_PREFIXES`;
SAM never belongs to it. Whoever checks that a state fits another one (the model loading a state,
the server averaging replies, a site auditing its reply, the coordinator resuming from a
checkpoint) calls :func:`state_mismatches` and words the first (or every) difference for its reader.

Duck-typed on ``.shape`` / ``.dtype``: torch tensors, NumPy arrays and Flower ``Array`` objects alike,
so it needs neither torch nor NumPy nor Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Key prefixes of the trainable state: g (``prompt_generator.``) and h (``surrogate_decoder.``).
TRAINABLE_PREFIXES = ("prompt_generator.", "surrogate_decoder.")

#: {key: (shape, dtype name)}, e.g. ``{"prompt_generator.w": ((4, 3), "float32")}``.
Signature = dict[str, tuple[tuple[int, ...], str]]

FOREIGN, UNEXPECTED, MISSING, SHAPE, DTYPE = "foreign", "unexpected", "missing", "shape", "dtype"


def is_trainable_key(key: str) -> bool:
    """Whether ``key`` belongs to g or h (never to SAM)."""
    return str(key).startswith(TRAINABLE_PREFIXES)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def _dtype(value: Any) -> str:
    """``float32``, ``int64``, ... for torch, NumPy and Flower ``Array`` (whose dtype is already a string)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    return str(dtype).replace("torch.", "")


def state_signature(state: Mapping[str, Any]) -> Signature:
    """{key: (shape, dtype name)} of a state of torch tensors, NumPy arrays or Flower Arrays."""
    return {str(k): (_shape(v), _dtype(v)) for k, v in state.items()}


@dataclass(frozen=True)
class StateMismatch:
    """One difference between a state and its reference.

    ``kind``: :data:`FOREIGN` (a key outside g/h, e.g. SAM's), :data:`UNEXPECTED` (a g/h key the
    reference lacks), :data:`MISSING` (a reference key the state lacks), :data:`SHAPE` or
    :data:`DTYPE`. ``found`` / ``expected``: the key's (shape, dtype) in the state / the reference
    (None on the side that lacks it).
    """

    kind: str
    key: str
    found: tuple[tuple[int, ...], str] | None
    expected: tuple[tuple[int, ...], str] | None


def state_mismatches(state: Mapping[str, Any], reference: Mapping[str, Any] | None,
                     compare_dtypes: bool = False) -> list[StateMismatch]:
    """Every difference between ``state`` and ``reference`` (states, or :data:`Signature` s).

    Order: first the keys of ``state`` that ``reference`` lacks, in ``state``'s order (:data:`FOREIGN`
    for a key outside g/h, else :data:`UNEXPECTED`); then, in ``reference``'s order, :data:`MISSING`
    keys and keys whose shape (:data:`SHAPE`) or, with ``compare_dtypes``, dtype (:data:`DTYPE`)
    differs. With ``reference`` None only the :data:`FOREIGN` keys are reported.

    Returns:
        an empty list when the state fits.
    """
    got = _as_signature(state)
    if reference is None:
        return [StateMismatch(FOREIGN, k, got[k], None) for k in got if not is_trainable_key(k)]
    want = _as_signature(reference)
    out = [StateMismatch(UNEXPECTED if is_trainable_key(k) else FOREIGN, k, got[k], None)
           for k in got if k not in want]
    for key, ref in want.items():
        mine = got.get(key)
        if mine is None:
            out.append(StateMismatch(MISSING, key, None, ref))
        elif mine[0] != ref[0]:
            out.append(StateMismatch(SHAPE, key, mine, ref))
        elif compare_dtypes and mine[1] != ref[1]:
            out.append(StateMismatch(DTYPE, key, mine, ref))
    return out


def _as_signature(state: Mapping[str, Any]) -> Signature:
    """A :data:`Signature` as it is, a state's :func:`state_signature` otherwise."""
    first = next(iter(state.values()), None)
    if isinstance(first, tuple):
        return {str(k): (tuple(v[0]), str(v[1])) for k, v in state.items()}
    return state_signature(state)
