"""Federated averaging of trainable states (pure NumPy; no Flower, no torch).

The server-side maths of FedAvg (McMahan et al. 2017), kept apart from Flower so it can be tested
on synthetic arrays:

    w_global[k] = sum_i n_i * w_i[k] / sum_i n_i        (n_i = training samples of site i)

Differences from ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (checked in
flwr 1.42): sites that trained on 0 samples are ignored instead of dividing by a zero total
weight; every array keeps its dtype (Flower's version turns BatchNorm ``num_batches_tracked``
int64 into float64); a reply holding a non-finite value, a SAM key or a differently shaped array
is rejected with a message naming the key, never averaged into the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from autosam_core.trainable_state import FOREIGN, MISSING, UNEXPECTED, is_trainable_key, state_mismatches


class AggregationError(ValueError):
    """Replies cannot be averaged (no contributing site, or inconsistent keys/shapes)."""


def structure_mismatch(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Why ``state`` does not have exactly the keys and shapes of ``reference``, or None.

    Returns:
        None, or a one-line reason naming the first offending key (and both shapes): a missing key
        first, then an unexpected one, then a shape (:func:`autosam_core.trainable_state.state_mismatches`).
    """
    diff = state_mismatches(state, reference)
    if not diff:
        return None
    m = next((d for d in diff if d.kind == MISSING), None) or diff[0]
    if m.kind == MISSING:
        return f"missing key {m.key!r} (expected shape {m.expected[0]})"
    if m.kind in (UNEXPECTED, FOREIGN):
        return f"unexpected key {m.key!r}"
    return f"key {m.key!r}: shape {m.found[0]} in the reply, {m.expected[0]} in the global model"


def check_state(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Return why ``state`` must not be averaged, or None when it is fine.

    Checks, in order: every key starts with ``prompt_generator.`` or ``surrogate_decoder.`` (SAM
    never travels); with ``reference`` (the global state sent this round) the key sets are equal
    and every shape matches; every floating value is finite.

    Returns:
        None, or a one-line reason naming the first offending key (and both shapes).
    """
    foreign = next((k for k in state if not is_trainable_key(k)), None)
    if foreign is not None:
        return (f"key {foreign!r} is not part of the trainable state "
                "(only prompt_generator.* / surrogate_decoder.* may travel)")
    if reference is not None:
        reason = structure_mismatch(state, reference)
        if reason:
            return reason
    for key, value in state.items():
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return f"key {key!r} holds non-finite values (NaN or inf)"
    return None


def check_num_examples(value: object) -> str | None:
    """Why ``value`` is not a usable sample count (a finite number >= 0), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"num-examples must be a number, found {type(value).__name__}"
    if not math.isfinite(value) or value < 0:
        return f"num-examples must be finite and >= 0, found {value}"
    return None


def weighted_average(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Average ``states`` key by key, weighted by ``weights`` (sample counts); zero weights are skipped.

    Each key is computed as ``numpy.average(stack, axis=0, weights=w)`` in float64 and cast back to
    the dtype of the first contributing state (integer buffers such as ``num_batches_tracked`` are
    rounded to the nearest integer and stay int64).

    Args:
        states: one mapping key -> array per site; all contributing ones must share keys and shapes.
        weights: samples per site (same length as ``states``), each finite and >= 0.

    Returns:
        dict key -> array, same dtypes and shapes as the inputs.

    Raises:
        AggregationError: no state has a positive weight, lengths differ, a weight is invalid, or
        the contributing states differ in keys or shapes (the message names the key).
    """
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} states but {len(weights)} weights")
    for w in weights:
        reason = check_num_examples(w)
        if reason:
            raise AggregationError(reason)
    used = [(s, float(w)) for s, w in zip(states, weights) if w > 0]
    if not used:
        raise AggregationError("no site trained on any sample (every weight is 0); nothing to average")
    ref = used[0][0]
    for s, _ in used[1:]:
        reason = structure_mismatch(s, ref)
        if reason:
            raise AggregationError(reason)
    w = np.asarray([u[1] for u in used], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for key, first in ref.items():
        first = np.asarray(first)
        stack = np.stack([np.asarray(s[key], dtype=np.float64) for s, _ in used])
        avg = np.average(stack, axis=0, weights=w)
        if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
            avg = np.rint(avg)
        out[key] = np.asarray(avg).astype(first.dtype, copy=False).reshape(first.shape)
    return out
