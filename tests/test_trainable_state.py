"""autosam_core.trainable_state: the one comparison of trainable states (keys, shapes, dtypes)."""

from __future__ import annotations

import numpy as np
import torch

from autosam_core.trainable_state import (DTYPE, FOREIGN, MISSING, SHAPE, UNEXPECTED, StateMismatch,
                                          state_mismatches, state_signature)


def test_signature_is_the_same_for_torch_numpy_and_flower_arrays():
    from flwr.app import ArrayRecord

    t = {"prompt_generator.w": torch.zeros(2, 3), "prompt_generator.n": torch.tensor(5, dtype=torch.int64)}
    n = {k: v.numpy() for k, v in t.items()}
    want = {"prompt_generator.w": ((2, 3), "float32"), "prompt_generator.n": ((), "int64")}
    assert state_signature(t) == state_signature(n) == state_signature(ArrayRecord(t)) == want


def test_mismatches_in_order_with_kinds_and_both_sides():
    ref = {"prompt_generator.a": np.zeros((2, 2), np.float32), "prompt_generator.b": np.zeros(3, np.float32),
           "surrogate_decoder.c": np.zeros(1, np.float32)}
    state = {"sam.x": np.zeros(1), "prompt_generator.a": np.zeros((2, 2), np.float64),
             "prompt_generator.z": np.zeros(1), "prompt_generator.b": np.zeros(4, np.float32)}
    assert state_mismatches(state, ref) == [
        StateMismatch(FOREIGN, "sam.x", ((1,), "float64"), None),
        StateMismatch(UNEXPECTED, "prompt_generator.z", ((1,), "float64"), None),
        StateMismatch(SHAPE, "prompt_generator.b", ((4,), "float32"), ((3,), "float32")),
        StateMismatch(MISSING, "surrogate_decoder.c", None, ((1,), "float32")),
    ]
    dtypes = state_mismatches(state, state_signature(ref), compare_dtypes=True)  # a Signature as reference
    assert [(m.kind, m.key) for m in dtypes][2] == (DTYPE, "prompt_generator.a")
    assert state_mismatches(state, None) == [StateMismatch(FOREIGN, "sam.x", ((1,), "float64"), None)]
    assert state_mismatches(ref, ref) == []
