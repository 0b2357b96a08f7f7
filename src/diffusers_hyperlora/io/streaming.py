"""Writing a `.safetensors` file tensor by tensor, so a multi-gigabyte checkpoint never sits in memory twice.

The safetensors layout is: 8 bytes (little-endian u64) giving the header length, a JSON header mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header)
plus an optional `"__metadata__"` string map, then the raw little-endian bytes of every tensor. The header may be
padded with spaces.

`SafetensorsStreamWriter` is told every tensor's name, dtype and shape up front, reserves room for the header,
writes the data in whatever order the tensors arrive (each tensor possibly in several consecutive chunks along
its first dimension), then goes back and writes the header with the real offsets.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes a tensor of `dtype` and `shape` takes on disk."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """Write a safetensors file incrementally.

    Args:
        path: the output file (overwritten).
        entries: `{name: (dtype, shape)}` of every tensor the file will hold.
        metadata: the string map stored as `__metadata__`.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file
        >>> path = tempfile.mktemp(suffix=".safetensors")
        >>> with SafetensorsStreamWriter(path, {"w": (torch.float32, (2, 3))}) as writer:
        ...     writer.write("w", torch.zeros(1, 3))
        ...     writer.write("w", torch.ones(1, 3))  # second chunk along dim 0
        >>> load_file(path)["w"].sum().item()
        3.0
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Mapping[str, tuple[torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
            raise RuntimeError("SafetensorsStreamWriter writes raw tensor memory and needs a little-endian machine.")
        self.path = os.fspath(path)
        self.entries = {}
        for name, (dtype, shape) in entries.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"Tensor {name!r}: dtype {dtype} cannot be stored in safetensors by this writer.")
            self.entries[name] = (dtype, tuple(int(s) for s in shape))
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.total_bytes = sum(tensor_nbytes(d, s) for d, s in self.entries.values())
        self._header_size = self._reserve_header()
        self._offsets: dict[str, tuple[int, int]] = {}
        self._current: str | None = None
        self._current_written = 0
        self._position = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(b"\0" * (8 + self._header_size))

    def _header(self, offsets: Mapping[str, tuple[int, int]]) -> bytes:
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        for name, (dtype, shape) in self.entries.items():
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": list(offsets[name]),
            }
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    def _reserve_header(self) -> int:
        # Offsets never exceed total_bytes, so a header written with that value everywhere is the longest possible.
        longest = len(self._header({name: (self.total_bytes, self.total_bytes) for name in self.entries}))
        return (longest + 7) // 8 * 8

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (the whole tensor, or the next chunk of it along dim 0) to tensor `name`."""
        if name not in self.entries:
            raise KeyError(f"{name!r} was not declared to this SafetensorsStreamWriter.")
        dtype, shape = self.entries[name]
        if tensor.dtype != dtype:
            raise ValueError(f"Tensor {name!r} was declared {dtype}, got a chunk of {tensor.dtype}.")
        if name != self._current:
            self._finish_current()
            if name in self._offsets:
                raise ValueError(f"Tensor {name!r} was already written; chunks of one tensor must be consecutive.")
            self._current, self._current_written = name, 0
        if tuple(tensor.shape[1:]) != shape[1:] and tuple(tensor.shape) != shape:
            raise ValueError(f"Chunk of {name!r} has shape {list(tensor.shape)}, which does not fit {list(shape)}.")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        expected = tensor_nbytes(dtype, shape)
        if self._current_written + data.nbytes > expected:
            raise ValueError(f"Tensor {name!r} received more than its declared shape {list(shape)}.")
        self._file.write(data.data)
        self._current_written += data.nbytes

    def _finish_current(self) -> None:
        if self._current is None:
            return
        dtype, shape = self.entries[self._current]
        expected = tensor_nbytes(dtype, shape)
        if self._current_written != expected:
            raise ValueError(
                f"Tensor {self._current!r} got {self._current_written} bytes, its shape {list(shape)} needs {expected}."
            )
        self._offsets[self._current] = (self._position, self._position + expected)
        self._position += expected
        self._current = None

    def close(self) -> None:
        """Check every declared tensor was written, then write the header."""
        if self._file.closed:
            return
        try:
            self._finish_current()
            missing = [name for name in self.entries if name not in self._offsets]
            if missing:
                raise ValueError(f"Tensors never written: {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
            header = self._header(self._offsets)
            header += b" " * (self._header_size - len(header))
            self._file.seek(0)
            self._file.write(len(header).to_bytes(8, "little"))
            self._file.write(header)
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
