"""One output tensor's inputs and its output as flat runs of elements (memory order), so that a method can make
several passes over a large tensor while holding only a run of it at a time; and each thread's scratch buffers,
reused from run to run."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from merger.engine.safetensors_io import PlannedFile, StoredTensor, view

if TYPE_CHECKING:
    from merger.engine.draws import Stream

CHUNK_ELEMENTS = 4 * 1024 * 1024  # per run of a large tensor


@dataclass(frozen=True)
class Inputs:
    stored: tuple[StoredTensor, ...]  # in mergekit's input order
    load_dtype: torch.dtype | None  # the config's ``dtype``, applied at load
    dtype: torch.dtype  # what the method sees: the load dtype, then promotion over the inputs
    device: str
    draws: "Stream | None" = None  # DARE on the CPU: the generator's replay at this tensor's first draw
    held: dict = field(default_factory=dict, compare=False)  # inputs of a tensor that is one run, read once

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored[0].spec.shape

    @property
    def numel(self) -> int:
        return self.stored[0].spec.numel

    def read(self, i: int, span: slice | None = None) -> torch.Tensor:
        """Input i: whole and shaped, or a flat run of its elements. A tensor of one run (CHUNK_ELEMENTS at most)
        is read once and held for the methods' later passes: what this returns must not be modified."""
        key = (i, span is None)
        hold = self.numel <= CHUNK_ELEMENTS and (span is None or (span.start == 0 and span.stop == self.numel))
        if hold and key in self.held:
            return self.held[key]
        tensor = view(self.stored[i], span).to(self.device)
        if self.load_dtype:
            tensor = tensor.to(self.load_dtype)
        tensor = tensor.to(self.dtype)
        if hold:
            self.held[key] = tensor
        return tensor

    def spans(self, elements: int = 0, multiple: int = 1) -> list[slice]:
        """Runs of about ``elements`` (default CHUNK_ELEMENTS) elements, each a multiple of ``multiple`` but the last."""
        step = max(1, (elements or CHUNK_ELEMENTS) // multiple) * multiple
        return [slice(start, min(start + step, self.numel)) for start in range(0, self.numel, step)] or [slice(0, 0)]

    def unchanged(self, base: int, checked: Callable[[slice, torch.Tensor], None]) -> bool:
        """Every input holds the base's bits and the base is finite: each task vector is exactly +0.0. Each run of
        the base that passes goes to ``checked(span, run)`` at once (a caller writes what the output would be, so
        the base is read once; a run written before a later one fails is written again by the caller)."""
        for span in self.spans():
            reference = self.read(base, span)
            bits = reference.view(torch.uint8)
            for i in range(len(self.stored)):
                if i != base and not torch.equal(self.read(i, span).view(torch.uint8), bits):
                    return False
            if reference.numel() and not bool(torch.isfinite(reference.abs().amax())):  # amax propagates NaN
                return False
            checked(span, reference)
        return True


_scratch = threading.local()


def scratch(name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of ``count`` elements that this thread reuses from call to call (a fresh one per run would
    cost its pages' faults each time); valid until the next call with the same name and dtype in this thread."""
    key = f"{name}:{dtype}"
    buffer = getattr(_scratch, key, None)
    if buffer is None or buffer.numel() < count:
        buffer = torch.empty(count, dtype=dtype)
        setattr(_scratch, key, buffer)
    return buffer[:count]


@dataclass(frozen=True)
class Output:
    file: PlannedFile
    name: str
    dtype: torch.dtype

    def write(self, tensor: torch.Tensor, first_element: int = 0) -> None:
        self.file.write(self.name, tensor.to(self.dtype), first_element)
