"""The numpy values an EDM or EDM2 snapshot may hold, rebuilt by the safe unpickler without
running anything the pickle names: dtypes, scalars (EDM's `skip_scale=np.sqrt(0.5)`) and small
arrays (EDM2's StabilityVAEEncoder keeps its latent `scale` and `bias` as float32 arrays).

Each function validates its arguments and refuses object dtypes (whose data would be further
pickled objects). An array unpickles as `ArrayStub`, an inert holder whose `__setstate__`
(pickle's BUILD) checks numpy's array state (version, shape, dtype, fortran order, raw bytes)
and keeps a read-only copy of the values in `.array`.
"""

from __future__ import annotations

import math
from typing import Any

from pid_fast.io.errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = ["NDArrayMarker", "ArrayStub", "numpy_dtype", "numpy_scalar", "numpy_reconstruct", "numpy_frombuffer"]


class NDArrayMarker:
    """What `numpy.ndarray` resolves to in a pickle (a fresh subclass per reference): only a
    marker for numpy_reconstruct."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise UnsafeCheckpointError("refusing to construct numpy.ndarray directly")


class ArrayStub:
    """A numpy array rebuilt from its pickled state (see the module docstring)."""

    __slots__ = ("array",)

    def __init__(self, array: Any = None):
        self.array = array

    def __setstate__(self, state: Any) -> None:
        import numpy as np

        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise CheckpointFormatError("numpy array: unexpected pickled state")
        shape, dtype, fortran, data = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise UnsafeCheckpointError(f"refusing to load a numpy array of dtype {dtype!r}")
        self.array = _array_from_bytes(data, dtype, shape, "F" if fortran else "C")

    def __repr__(self) -> str:
        return f"ArrayStub({self.array!r})"


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                               for n in shape):
        raise CheckpointFormatError(f"numpy array: shape must be a tuple of non-negative ints, got {shape!r}")
    return shape


def _array_from_bytes(data: Any, dtype: Any, shape: Any, order: str) -> Any:
    import numpy as np

    shape = _shape(shape)
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointFormatError(f"numpy array: expected raw bytes, got {type(data).__name__}")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise CheckpointFormatError(f"numpy array: {len(data)} bytes do not fill shape {shape} of {dtype}")
    array = np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()
    array.setflags(write=False)
    return array


def numpy_dtype(*args: Any) -> Any:
    """numpy.dtype(name, align, copy) for a non-object dtype."""
    import numpy as np

    if not args or not isinstance(args[0], str) or not all(isinstance(a, (bool, int)) for a in args[1:]):
        raise CheckpointFormatError(f"numpy.dtype: unexpected arguments {args!r}")
    dtype = np.dtype(args[0])
    if dtype.hasobject:
        raise UnsafeCheckpointError("refusing to load a numpy object dtype")
    return np.dtype(*args)


def numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy.core.multiarray.scalar(dtype, bytes) for a non-object dtype."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"refusing to build a numpy scalar of dtype {dtype!r}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise CheckpointFormatError(f"numpy scalar: expected {dtype.itemsize} bytes of data")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def numpy_reconstruct(subtype: Any, shape: Any, typecode: Any) -> ArrayStub:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'): an empty ArrayStub that pickle's
    BUILD then fills (protocols 2-4)."""
    if not (isinstance(subtype, type) and issubclass(subtype, NDArrayMarker)):
        raise UnsafeCheckpointError(f"refusing to reconstruct a numpy array of type {subtype!r}")
    if not isinstance(typecode, (bytes, str)):
        raise CheckpointFormatError("numpy array: unexpected typecode")
    _shape(shape)
    return ArrayStub()


def numpy_frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> ArrayStub:
    """numpy.core.numeric._frombuffer(buffer, dtype, shape, order) (protocol 5, in-band)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"refusing to load a numpy array of dtype {dtype!r}")
    if order not in ("C", "F"):
        raise CheckpointFormatError(f"numpy array: unexpected order {order!r}")
    return ArrayStub(_array_from_bytes(data, dtype, shape, order))
