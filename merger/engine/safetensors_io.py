"""safetensors files read and written tensor by tensor (no whole-file memory maps kept resident).

Reading: a tensor, or a run of its elements, is mapped copy-on-write while it is used (no copy out of the page
cache), or, when small, read with ``os.preadv`` into a tensor. Writing: the header is computed up front
from the names, dtypes and shapes, exactly as ``safetensors.torch.save_file`` lays a file out, and each tensor
is written straight to its place with ``os.pwrite``; nothing is buffered. The file's sha256 is taken meanwhile
(``merger.hashing.PrefixDigest``), so the store need not read it again.
"""

import ctypes
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merger.hashing import PrefixDigest

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# safetensors orders tensors in a file by dtype (its enum order, descending), then by name
_DTYPE_RANK = {name: rank for rank, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"])}
METADATA = {"format": "pt"}  # what safetensors.torch.save_file(..., metadata={"format": "pt"}) records
# runs at least this large are mapped by ``view``: reading 8 MB runs of Gemma 3's embedding by mapping took 0.10-0.17 s
# a pass, by preadv 0.22-0.28 s (the copy out of the page cache); smaller ones are read (a mapping costs syscalls)
MAPPED_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    spec: TensorSpec
    offset: int  # absolute, in the file


class UnsupportedFile(ValueError):
    """A safetensors file with a dtype this module does not read."""


def read_header(path: Path) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        size = os.fstat(f.fileno()).st_size
    header.pop("__metadata__", None)
    if unknown := {entry["dtype"] for entry in header.values()} - set(DTYPES):
        raise UnsupportedFile(f"{path.name}: dtypes {sorted(unknown)}")
    if 8 + length + max((entry["data_offsets"][1] for entry in header.values()), default=0) > size:
        raise UnsupportedFile(f"{path.name}: shorter than its header says (truncated?)")  # a mapping past the end would crash
    return {
        name: StoredTensor(path, TensorSpec(DTYPES[entry["dtype"]], tuple(entry["shape"])), 8 + length + entry["data_offsets"][0])
        for name, entry in header.items()
    }


def model_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of a model directory's ``*.safetensors`` files."""
    tensors: dict[str, StoredTensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(read_header(shard))
    return tensors


def _buffer(tensor: torch.Tensor):
    return (ctypes.c_ubyte * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())


def view(stored: StoredTensor, span: slice | None = None) -> torch.Tensor:
    """One tensor, or a run of its elements (flat, in memory order), of the stored dtype: mapped from its file
    copy-on-write (writes to it stay private) for as long as the returned tensor lives, or, for a run smaller than
    MAPPED_BYTES, read into a new tensor. The file is opened per call; the page cache is the only cache."""
    shape, start = (stored.spec.shape, 0) if span is None else ((span.stop - span.start,), span.start * stored.spec.dtype.itemsize)
    count = TensorSpec(stored.spec.dtype, shape).numel
    if count * stored.spec.dtype.itemsize >= MAPPED_BYTES:
        begin = stored.offset + start
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(stored.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), begin - aligned + count * stored.spec.dtype.itemsize, access=mmap.ACCESS_COPY,
                                offset=aligned)
        return torch.frombuffer(mapping, dtype=stored.spec.dtype, count=count, offset=begin - aligned).view(shape)
    tensor = torch.empty(shape, dtype=stored.spec.dtype)
    if count:
        fd = os.open(stored.path, os.O_RDONLY)
        try:
            buffer, done = memoryview(_buffer(tensor)).cast("B"), 0
            while done < len(buffer):
                read = os.preadv(fd, [buffer[done:]], stored.offset + start + done)
                if read == 0:
                    raise OSError(f"{stored.path} ends inside a tensor")
                done += read
        finally:
            os.close(fd)
    return tensor


def header_bytes(specs: dict[str, TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """The header safetensors writes for these tensors, and each tensor's offset in the data section."""
    order = sorted(specs, key=lambda name: (-_DTYPE_RANK[NAMES[specs[name].dtype]], name))
    entries: dict[str, object] = {"__metadata__": METADATA}
    offsets, position = {}, 0
    for name in order:
        spec = specs[name]
        offsets[name] = position
        entries[name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [position, position + spec.nbytes]}
        position += spec.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class PlannedFile:
    """An output file whose layout is fixed before any tensor is computed; tensors are written in any order."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec]):
        header, offsets = header_bytes(specs)
        self.path, self.specs = path, specs
        self.offsets = {name: len(header) + offset for name, offset in offsets.items()}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, header, 0)
        size = len(header) + sum(spec.nbytes for spec in specs.values())
        os.ftruncate(self.fd, size)
        self.digest = PrefixDigest(path, size)  # hashed as tensors are finished, while the others are computed
        self.digest.final(0, len(header))

    def write(self, name: str, tensor: torch.Tensor, first_element: int = 0) -> None:
        """The tensor, or a flat run of its elements starting at ``first_element``, written to its place."""
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or first_element + tensor.numel() > spec.numel:
            raise ValueError(f"{name}: planned {spec}, computed {tensor.dtype} {tuple(tensor.shape)} at element {first_element}")
        tensor = tensor.detach().to("cpu").contiguous()
        if not tensor.numel():
            return
        start = self.offsets[name] + first_element * spec.dtype.itemsize
        view, done = memoryview(_buffer(tensor)).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)

    def finished(self, name: str) -> None:
        """The tensor is written whole and will not change."""
        self.digest.final(self.offsets[name], self.offsets[name] + self.specs[name].nbytes)

    def close(self) -> None:
        os.close(self.fd)
