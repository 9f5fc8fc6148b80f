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

**Packing.** Flower 1.42 stores and sends every Array of an ArrayRecord as its own object: one push or
pull request per array (and per 5 MB chunk) on every hop (ServerApp -> SuperLink -> SuperNode ->
ClientApp and back; ``flwr/supercore/inflatable/inflatable_utils.py``, at most ``os.cpu_count()`` requests
in flight). A g of 254 tensors (the tiny MobileNetV3 of the tests) thus cost hundreds of signed TLS requests
per site per round; a round of a 6-site federation took 92 s deployed against 3-9 s simulated. So the wire
holds one array per dtype (:func:`pack_arrays`): the arrays of that dtype concatenated in key order, plus
a ``__layout__`` array (uint8 JSON of ``[key, shape, dtype]`` per array) that :func:`unpack_arrays` reads
to cut them back into the same keys, shapes and dtypes. :func:`to_wire` / :func:`from_wire` are the two
ends both sides call.

No torch import: the coordinator uses this module (``autosam-server`` runs without torch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

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
    x = np.asarray(x, dtype=np.float32, order="C")
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep the sign, force a quiet NaN
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 array (exact: every bfloat16 is a float32)."""
    return (np.asarray(bits, dtype=np.uint16, order="C").astype(np.uint32) << 16).view(np.float32)


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
                arr = np.asarray(arr, dtype=WIRE_DTYPE[transfer_dtype], order="C")
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


# ----- packing: one wire array per dtype --------------------------------------------------------------
#: Key of the uint8 JSON layout array of a packed record.
LAYOUT_KEY = "__layout__"
#: Key of the packed array of one dtype: ``PACKED_KEY.format(dtype="float32")``.
PACKED_KEY = "__packed_{dtype}__"


class WireFormatError(ValueError):
    """A packed record does not match its own layout (missing/extra/short/long buffers, bad JSON)."""


def pack_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """key -> array (any shapes, numeric dtypes) -> the few arrays that travel (see the module docstring).

    Args:
        arrays: key -> NumPy array / torch tensor / Flower Array, in the order they should come back.

    Returns:
        ``{LAYOUT_KEY: uint8 (n,), PACKED_KEY.format(dtype=d): 1-D array of dtype d, ...}``: one packed
        array per distinct dtype, in order of first appearance; the values are copied bit for bit.
    """
    layout: list[list] = []
    groups: dict[str, list[np.ndarray]] = {}
    for key, value in arrays.items():
        arr = np.asarray(_as_numpy(value), order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        layout.append([str(key), [int(n) for n in arr.shape], arr.dtype.name])
        groups.setdefault(arr.dtype.name, []).append(arr.reshape(-1))
    out = {LAYOUT_KEY: np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8).copy()}
    for name, parts in groups.items():
        out[PACKED_KEY.format(dtype=name)] = np.concatenate(parts)
    return out


def _layout_of(raw: np.ndarray) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise WireFormatError(f"array {LAYOUT_KEY!r} must be 1-D uint8 (JSON), found {raw.dtype} {tuple(raw.shape)}")
    try:
        entries = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireFormatError(f"array {LAYOUT_KEY!r} is not UTF-8 JSON: {err}") from None
    if not isinstance(entries, list):
        raise WireFormatError(f"array {LAYOUT_KEY!r} must hold a JSON list, found {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], list) and all(isinstance(n, int) and n >= 0 for n in entry[1])
              and isinstance(entry[2], str))
        dtype = None
        if ok:
            try:
                dtype = np.dtype(entry[2])
            except TypeError:
                ok = False
        if not ok or dtype.kind not in "biuf":
            raise WireFormatError(f"{LAYOUT_KEY!r} entry {i} must be [key, [dims >= 0], numeric dtype name], "
                                  f"found {str(entry)[:120]}")
        out.append((entry[0], tuple(entry[1]), dtype))
    return out


def unpack_arrays(wire: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a record as sent -> key -> NumPy array, undoing :func:`pack_arrays`.

    A record without :data:`LAYOUT_KEY` is read as one array per key (what ``ArrayRecord(state_dict)``
    builds), so a message built by hand reads the same.

    Returns:
        key -> NumPy array (views into the packed buffers: copy before writing), in the layout's order.

    Raises:
        WireFormatError: the layout is not valid, names a key twice, or a packed array is missing, has
        another dtype than its name, is not 1-D, holds fewer or more values than the layout says, or the
        record holds an array the layout does not account for (message names the key and both counts).
    """
    if LAYOUT_KEY not in wire:
        return {k: _as_numpy(v) for k, v in wire.items()}
    layout = _layout_of(_as_numpy(wire[LAYOUT_KEY]))
    buffers: dict[str, np.ndarray] = {}
    offsets: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    for key, shape, dtype in layout:
        if key in out:
            raise WireFormatError(f"{LAYOUT_KEY!r} names array {key!r} twice")
        name = PACKED_KEY.format(dtype=dtype.name)
        if name not in buffers:
            if name not in wire:
                raise WireFormatError(f"array {key!r} is {dtype.name} but the record holds no {name!r}")
            buf = _as_numpy(wire[name])
            if buf.dtype != dtype or buf.ndim != 1:
                raise WireFormatError(f"array {name!r} must be 1-D {dtype.name}, found {buf.dtype} {tuple(buf.shape)}")
            buffers[name], offsets[name] = buf, 0
        count = int(np.prod(shape, dtype=np.int64))
        start = offsets[name]
        if start + count > buffers[name].size:
            raise WireFormatError(f"array {key!r} {shape} needs values {start}..{start + count} of {name!r}, "
                                  f"which holds {buffers[name].size}")
        out[key] = buffers[name][start:start + count].reshape(shape)
        offsets[name] = start + count
    for name, buf in buffers.items():
        if offsets[name] != buf.size:
            raise WireFormatError(f"array {name!r} holds {buf.size} values, its layout accounts for {offsets[name]}")
    extra = sorted(set(wire) - set(buffers) - {LAYOUT_KEY})
    if extra:
        raise WireFormatError(f"the record holds {len(extra)} array(s) its layout does not name, first {extra[0]!r}")
    return out


def to_wire(state: Mapping[str, Any], transfer_dtype: str) -> ArrayRecord:
    """g's state -> the ArrayRecord that travels: :func:`encode_state`, then :func:`pack_arrays`.

    Args:
        state: key -> float32 / integer tensor or array (g/h's trainable state).
        transfer_dtype: one of :data:`TRANSFER_DTYPES`.

    Raises:
        TransferDtypeError: unknown ``transfer_dtype``.
    """
    return ArrayRecord({k: Array(v) for k, v in pack_arrays(encode_state(state, transfer_dtype)).items()})


def from_wire(record: Mapping[str, Any], transfer_dtype: str,
              reference: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The ArrayRecord that came -> key -> float32 (floating) / integer NumPy arrays.

    :func:`unpack_arrays`, then :func:`decode_state` (``reference`` as there).

    Raises:
        WireFormatError: the packed record does not match its layout.
        TransferDtypeError: a floating array is not in the wire dtype of ``transfer_dtype``.
    """
    return decode_state(unpack_arrays(record), transfer_dtype, reference)
