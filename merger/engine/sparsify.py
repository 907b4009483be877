"""Task-vector sparsification as mergekit 0.1.5 does it (magnitude top-k, DARE's Bernoulli drop, breadcrumbs'
band of magnitudes), with the top-k found without a full argsort (see ``topk``).

Each sparsifier runs on a whole task vector (``whole``), or decides from passes over runs of it what it keeps
and by what factor it rescales (``select``), applied to runs of it later: memory for one whole buffer of
magnitudes (or a mask) at a time instead of the task vectors and their temporaries."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from merger.engine.topk import top_k_mask

RESCALE_EPS = 1e-7


def _masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """The tensor times its mask; with rescale, scaled back to the tensor's L1 norm."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _top_k(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """The elements magnitude keeps, of flat magnitudes (used as scratch): a boolean mask."""
    return top_k_mask(magnitudes, max(1, int(density * magnitudes.numel())))


def _band(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' mask (in the magnitudes' dtype): all but the ``gamma`` largest and the smallest, keeping ``density``."""
    count = magnitudes.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    order = torch.sort(magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes, descending=False).indices
    mask = torch.zeros(count, dtype=magnitudes.dtype, device=magnitudes.device)
    mask[order[bottom:bottom + keep]] = 1
    return mask


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    mask = _top_k(tensor.abs().reshape(-1), density).to(tensor.dtype)
    return _masked(tensor, mask.reshape_as(tensor), rescale)


def random(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` (one draw per element from torch's global generator)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=_draw_dtype(tensor.dtype, tensor.device)))
    return _masked(tensor.to(mask.dtype), mask, rescale).to(tensor.dtype)


def _draw_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return dtype if device.type != "cpu" or dtype == torch.bfloat16 else torch.float32


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale: bool, gamma: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    return _masked(tensor, _band(tensor.abs().reshape(-1), density, gamma).reshape_as(tensor), rescale)


Runs = Callable[[], Iterable[tuple[slice, torch.Tensor]]]  # a fresh pass over a task vector: (span, run) in order


class Selection:
    """What a sparsifier makes of a task vector, applied run by run, in order: ``masks(span)`` gives the mask of a
    run (None: every element dropped), ``ratio`` the rescaling factor (None: not rescaled)."""

    def __init__(self, masks: Callable[[slice], torch.Tensor] | None, work: torch.dtype, keep_all: bool = False):
        self.masks, self.work, self.keep_all = masks, work, keep_all
        self.ratio: torch.Tensor | None = None

    def apply(self, delta: torch.Tensor, span: slice) -> torch.Tensor:
        if self.keep_all:
            return delta
        if self.masks is None:
            return torch.zeros_like(delta)
        masked = delta.to(self.work) * self.masks(span)
        if self.ratio is not None:
            masked = masked * self.ratio
        return masked.to(delta.dtype)

    def rescale(self, runs: Runs, numel: int, device) -> "Selection":
        """``_masked``'s rescaling: the two L1 norms are torch sums over the whole task vector, so each is taken
        over a whole buffer of magnitudes, filled run by run (|delta * mask| is |delta| * mask: masks are 0 or 1)."""
        if self.keep_all or self.masks is None:
            return self
        buffer, spans = torch.empty(numel, dtype=self.work, device=device), []
        for span, delta in runs():
            torch.abs(delta.to(self.work), out=buffer[span])
            spans.append(span)
        before = buffer.sum()
        for span in spans:
            buffer[span].mul_(self.masks(span))
        after = buffer.sum()
        if not (before < RESCALE_EPS or after < RESCALE_EPS):
            self.ratio = before / after
        return self


class _Draws:
    """DARE's masks, run by run, replayed from the generator's state before the task vector's draws; each pass
    (starting at element 0) draws the same masks again, but a tensor of one run keeps its mask."""

    def __init__(self, state: torch.Tensor, density: float, work: torch.dtype):
        from merger.engine.draws import Stream  # numba, on first use

        self.state, self.density, self.work, self.new_stream = state, density, work, Stream
        self.stream = Stream(state)
        self.last: tuple[slice | None, torch.Tensor | None] = (None, None)  # the run drawn last, and its mask

    def __call__(self, span: slice) -> torch.Tensor:
        if span == self.last[0]:  # a tensor of one run: its mask, drawn once for every pass
            return self.last[1]
        if span.start == 0:
            self.stream = self.new_stream(self.state)
        self.last = (span, self.stream.bernoulli(span.stop - span.start, self.density, self.work))
        return self.last[1]


def _magnitudes(runs: Runs, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    magnitudes = torch.empty(numel, dtype=dtype, device=device)
    for span, delta in runs():
        torch.abs(delta, out=magnitudes[span])
    return magnitudes


def select_magnitude(runs: Runs, numel: int, dtype: torch.dtype, device, density: float, rescale: bool, stream=None) -> Selection:
    if density >= 1:
        return Selection(None, dtype, keep_all=True)
    if density <= 0 or numel == 0:
        return Selection(None, dtype)
    mask = _top_k(_magnitudes(runs, numel, dtype, device), density)
    selection = Selection(lambda span: mask[span].to(dtype), dtype)
    return selection.rescale(runs, numel, device) if rescale else selection


def select_band(runs: Runs, numel: int, dtype: torch.dtype, device, density: float, rescale: bool, gamma: float,
                stream=None) -> Selection:
    if density >= 1:
        return Selection(None, dtype, keep_all=True)
    mask = _band(_magnitudes(runs, numel, dtype, device), density, gamma)
    selection = Selection(lambda span: mask[span], dtype)
    return selection.rescale(runs, numel, device) if rescale else selection


def select_random(runs: Runs, numel: int, dtype: torch.dtype, device, density: float, rescale: bool, stream=None) -> Selection:
    """DARE on the CPU: the masks ``torch.bernoulli`` draws from ``stream`` (a replay of the generator, at this task
    vector's first draw), which is left where drawing the whole mask at once leaves the generator."""
    if density >= 1:
        return Selection(None, dtype, keep_all=True)
    draws = _Draws(stream.torch_state(), density, _draw_dtype(dtype, torch.device(device)))
    selection = Selection(draws, draws.work)
    if rescale:
        selection.rescale(runs, numel, device)
    stream.skip(numel)
    return selection


def skip_draws(numel: int, dtype: torch.dtype, device, density: float, stream=None) -> None:
    """Advance the generator as ``random`` does on a task vector of ``numel`` elements (one draw per element): on the
    CPU ``stream`` (the replay), without drawing; elsewhere torch's generator, drawing."""
    if density >= 1:
        return
    if torch.device(device).type == "cpu":
        stream.skip(numel)
    else:
        torch.bernoulli(torch.full((numel,), density, dtype=_draw_dtype(dtype, torch.device(device)), device=device))


@dataclass(frozen=True)
class Sparsifier:
    whole: Callable[..., torch.Tensor]  # (task vector, density, rescale, **extra) -> sparsified
    select: Callable[..., Selection]  # (runs, numel, dtype, device, density, rescale, **extra, stream=replay or None)
    randomized: bool = False

    def streams(self, device: str) -> bool:
        """Whether ``select`` reproduces ``whole`` on this device (DARE's draws in runs: on the CPU only)."""
        return not self.randomized or torch.device(device).type == "cpu"

    def skip(self, numel: int, dtype: torch.dtype, device, density: float, stream=None) -> None:
        """What sparsifying an all-zero task vector leaves behind besides zeros: the generator's draws."""
        if self.randomized:
            skip_draws(numel, dtype, device, density, stream)


SPARSIFIERS = {
    "magnitude": Sparsifier(magnitude, select_magnitude),
    "random": Sparsifier(random, select_random, randomized=True),
    "magnitude_outliers": Sparsifier(magnitude_outliers, select_band),
}
