"""Flower ``Array`` <-> NumPy / PyTorch, exactly as Flower converts them, without its
per-call costs.

Flower stores an :class:`~flwr.app.Array` as ``.npy`` bytes (``np.save`` on the way in,
``np.load`` on the way out). For a small model that is most of what a message costs
in one process: ``np.load`` parses the header text with ``ast.literal_eval`` for every
array, every time. Here a header is parsed once (by NumPy's own parser) and remembered;
the data is then read with ``np.frombuffer`` and copied, so the result is the same
writable array ``Array.numpy()`` returns. On the way in, the ``.npy`` header of a
(dtype, shape) is taken once from ``np.save`` itself and reused with the array's bytes,
so the ``Array`` is byte for byte what Flower builds. Anything unusual (another
serialization type, Fortran order, object dtypes, a buffer that does not parse or has
the wrong length) goes through Flower's own code, which raises what it raises.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.app.message.array import SType  # noqa: F401 - re-exported for callers

_MAGIC = b"\x93NUMPY"
_MAX_HEADERS = 4096
_parsed: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
_headers: dict[tuple[str, tuple[int, ...]], tuple[bytes, str, tuple[int, ...]]] = {}


def _layout(data: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data offset) of a C-ordered ``.npy`` buffer, or ``None`` when only
    ``np.load`` can say (or refuse)."""
    if len(data) < 10 or data[:6] != _MAGIC:
        return None
    major = data[6]
    if major == 1:
        start, size = 10, int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        if len(data) < 12:
            return None
        start, size = 12, int.from_bytes(data[8:12], "little")
    else:
        return None
    key = data[:start + size]
    hit = _parsed.get(key)
    if hit is not None:
        return hit
    try:
        fp = io.BytesIO(key)
        version = np.lib.format.read_magic(fp)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(fp)
    except Exception:  # noqa: BLE001 - np.load will raise the real error
        return None
    if fortran or dtype.hasobject:
        return None
    if len(_parsed) >= _MAX_HEADERS:
        _parsed.clear()
    _parsed[key] = (dtype, tuple(shape), len(key))
    return _parsed[key]


def to_numpy(array: Array, writable: bool = True) -> np.ndarray:
    """``array.numpy()``: the same values, dtype and shape, a writable array (with
    ``writable=False``, possibly a read-only view of the Array's bytes: for checks that
    only read)."""
    if array.stype == SType.NUMPY and isinstance(array.data, (bytes, bytearray)):
        layout = _layout(array.data)
        if layout is not None:
            dtype, shape, offset = layout
            count = math.prod(shape)
            if len(array.data) - offset == count * dtype.itemsize:
                view = np.frombuffer(array.data, dtype=dtype, count=count,
                                     offset=offset).reshape(shape)
                return view.copy() if writable else view
    return array.numpy()


def from_numpy(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)``: the same ``.npy`` bytes Flower writes."""
    if not ndarray.flags.c_contiguous or ndarray.dtype.hasobject:
        return Array(ndarray)
    key = (ndarray.dtype.str, ndarray.shape)
    known = _headers.get(key)
    if known is None:
        built = Array(ndarray)
        header = built.data[:len(built.data) - ndarray.nbytes]
        if built.data[len(header):] != ndarray.tobytes():  # not the layout assumed here
            return built
        if len(_headers) >= _MAX_HEADERS:
            _headers.clear()
        _headers[key] = (header, built.dtype, built.shape)
        return built
    header, dtype, shape = known
    return _new_array(dtype, shape, b"".join((header, ndarray.data)))


def _plain_fields() -> bool:
    probe = Array(dtype="float32", shape=(1,), stype=SType.NUMPY, data=b"\0" * 4)
    return set(probe.__dict__) == {"_is_dirty", "dtype", "shape", "stype", "data"}


_PLAIN = _plain_fields()  # this Flower's Array holds exactly these fields after __init__


def _new_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=..., shape=..., stype=SType.NUMPY, data=...)`` for values already
    known to be valid (the checks of ``Array.__init__`` cost more than the rest)."""
    if not _PLAIN:
        return Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)
    array = Array.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=SType.NUMPY,
                          data=data)
    return array


def state_dict(record: ArrayRecord) -> OrderedDict:
    """``record.to_torch_state_dict()``: writable CPU tensors, in the record's order."""
    import torch

    return OrderedDict((k, torch.from_numpy(to_numpy(v))) for k, v in record.items())


def record_from_state(state) -> ArrayRecord:
    """``ArrayRecord(state_dict)``: every tensor (detached, on the CPU) as an Array."""
    return _record((k, from_numpy(v.detach().cpu().numpy())) for k, v in state.items())


def _record_store_ok() -> bool:
    probe = ArrayRecord()
    probe["x"] = Array(dtype="float32", shape=(1,), stype=SType.NUMPY, data=b"\0" * 4)
    store = probe.__dict__.get("_data")
    return isinstance(store, dict) and list(store) == ["x"] and probe.is_dirty


_STORE = _record_store_ok()  # this Flower's ArrayRecord keeps its items in a plain dict


def _record(items) -> ArrayRecord:
    """An ArrayRecord of ``(str, Array)`` pairs we built ourselves: without
    ``ArrayRecord(dict)``'s copy of every Array and its per-item type checks."""
    record = ArrayRecord()
    if _STORE:
        record.__dict__["_data"].update(items)
        return record
    for key, array in items:
        record[key] = array
    return record


def clone(array: Array) -> Array:
    """A new Array object with the same fields (the bytes are immutable and shared):
    what ``ArrayRecord(dict)`` makes of each Array, without validating it again."""
    twin = Array.__new__(type(array))
    twin.__dict__.update(array.__dict__)
    return twin


def copy_record(record: ArrayRecord) -> ArrayRecord:
    """A new ArrayRecord of new Array objects (:func:`clone`), in the same order."""
    return _record((k, clone(v)) for k, v in record.items())


def records(content, kind) -> dict:
    """The records of type ``kind`` (``ArrayRecord``, ``MetricRecord``, ``ConfigRecord``)
    of a RecordDict, in order, as a plain dict: what ``content.array_records`` (etc.)
    holds, without building a checked record dict on every call."""
    return {key: record for key, record in content.items() if isinstance(record, kind)}


class DecodedArray(Array):
    """An :class:`~flwr.app.Array` whose ``numpy()`` is :func:`to_numpy` (what Flower's
    strategies call when they aggregate); the bytes are the same object."""

    def numpy(self) -> np.ndarray:
        return to_numpy(self)


def decoded(record: ArrayRecord) -> ArrayRecord:
    """``record`` itself, every Array in it now a :class:`DecodedArray` (same object,
    same fields and bytes: only ``numpy()`` is faster). For records the caller owns,
    e.g. a reply the server received."""
    for array in record.values():
        if type(array) is Array:
            array.__class__ = DecodedArray
    return record


__all__ = ["DecodedArray", "clone", "copy_record", "decoded", "from_numpy", "record_from_state",
           "records", "state_dict",
           "to_numpy"]


def check_model_arrays(arrays: ArrayRecord, model_fn) -> None:
    """Raise ``ValueError`` unless ``arrays`` is the state of the model ``model_fn()``
    builds: the same names and shapes, and every floating parameter or buffer a floating
    array (an integer array there would truncate the weights). Checked before anything is
    accepted or written, not by every node at its first round."""
    import torch

    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        state = model_fn().state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    given = {k: tuple(arrays[k].shape) for k in arrays.keys()}
    problems = []
    if given != expected:
        missing = sorted(set(expected) - set(given))[:3]
        extra = sorted(set(given) - set(expected))[:3]
        shapes = [k for k in expected if k in given and given[k] != expected[k]][:3]
        problems += [f"missing {missing}" if missing else "",
                     f"unexpected {extra}" if extra else "",
                     f"other shapes for {shapes}" if shapes else ""]
    kinds = [k for k, v in state.items() if k in given and v.is_floating_point()
             and not np.issubdtype(np.dtype(arrays[k].dtype), np.floating)][:3]
    if kinds:
        problems.append(f"not floating point for {kinds} "
                        f"({', '.join(str(arrays[k].dtype) for k in kinds)})")
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("arrays are not the model model_fn builds: " + "; ".join(problems)
                         + " (pass the ArrayRecord of model_fn()'s state dict)")
