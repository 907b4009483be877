"""One output tensor's inputs and its output as flat runs of elements (memory order), so that a method can make
several passes over a large tensor while holding only a run of it at a time."""

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


@dataclass(frozen=True)
class Output:
    file: PlannedFile
    name: str
    dtype: torch.dtype

    def write(self, tensor: torch.Tensor, first_element: int = 0) -> None:
        self.file.write(self.name, tensor.to(self.dtype), first_element)
