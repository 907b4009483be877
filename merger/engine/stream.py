"""One output tensor's inputs and its output as flat runs of elements (memory order), so that a method can make
several passes over a large tensor while holding only a run of it at a time."""

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merger.engine.safetensors_io import PlannedFile, StoredTensor, load

CHUNK_ELEMENTS = 4 * 1024 * 1024  # per run of a large tensor


@dataclass(frozen=True)
class Inputs:
    stored: tuple[StoredTensor, ...]  # in mergekit's input order
    load_dtype: torch.dtype | None  # the config's ``dtype``, applied at load
    dtype: torch.dtype  # what the method sees: the load dtype, then promotion over the inputs
    device: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored[0].spec.shape

    @property
    def numel(self) -> int:
        return self.stored[0].spec.numel

    def read(self, i: int, span: slice | None = None) -> torch.Tensor:
        """Input i: whole and shaped, or a flat run of its elements."""
        tensor = load(self.stored[i], span).to(self.device)
        if self.load_dtype:
            tensor = tensor.to(self.load_dtype)
        return tensor.to(self.dtype)

    def stacked(self, span: slice) -> torch.Tensor:
        """Every input's run of elements as stored, one row each (for inputs stored in one dtype)."""
        rows = torch.empty((len(self.stored), span.stop - span.start), dtype=self.stored[0].spec.dtype)
        for row, stored in zip(rows, self.stored):
            load(stored, span, out=row)
        return rows

    def stored_as(self, dtype: torch.dtype) -> bool:
        """Whether every input is stored in ``dtype`` and the method sees it so, on the CPU."""
        return self.dtype == dtype and self.device == "cpu" and all(s.spec.dtype == dtype for s in self.stored)

    def spans(self, elements: int = 0, multiple: int = 1) -> list[slice]:
        """Runs of about ``elements`` (default CHUNK_ELEMENTS) elements, each a multiple of ``multiple`` but the last."""
        step = max(1, (elements or CHUNK_ELEMENTS) // multiple) * multiple
        return [slice(start, min(start + step, self.numel)) for start in range(0, self.numel, step)] or [slice(0, 0)]

    def unchanged(self, base: int) -> bool:
        """Every input holds the base's bits and the base is finite: each task vector is exactly +0.0."""
        for span in self.spans():
            reference = self.read(base, span)
            bits = reference.view(torch.uint8)
            for i in range(len(self.stored)):
                if i != base and not torch.equal(self.read(i, span).view(torch.uint8), bits):
                    return False
            if reference.numel() and not bool(torch.isfinite(reference.abs().amax())):  # amax propagates NaN
                return False
        return True


def in_threads(work: Callable[[slice], None], spans: Iterable[slice]) -> None:
    """work(span) for every span, on torch's number of threads: for compiled loops and file I/O, which release
    the GIL (torch ops would multiply their own threads)."""
    spans = list(spans)
    threads = min(torch.get_num_threads(), len(spans))
    if threads <= 1:
        for span in spans:
            work(span)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(work, spans):  # raises the first failure
            pass


@dataclass(frozen=True)
class Output:
    file: PlannedFile
    name: str
    dtype: torch.dtype

    def write(self, tensor: torch.Tensor, first_element: int = 0) -> None:
        self.file.write(self.name, tensor.to(self.dtype), first_element)
