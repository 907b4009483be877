"""Task-vector sparsification as mergekit 0.1.5 does it (magnitude top-k, DARE's Bernoulli drop, breadcrumbs'
band of magnitudes), with the top-k found without a full argsort (see ``topk``)."""

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


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = top_k_mask(tensor.abs().reshape(-1), k).to(tensor.dtype)
    return _masked(tensor, mask.reshape_as(tensor), rescale)


def random(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` (one draw per element from torch's global generator)."""
    if density >= 1:
        return tensor
    work = tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work))
    return _masked(tensor.to(work), mask, rescale).to(tensor.dtype)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale: bool, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` largest magnitudes and the smallest, keeping ``density``."""
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    magnitudes = tensor.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.sort(magnitudes, descending=False).indices
    mask = torch.zeros(count, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom:bottom + keep]] = 1
    return _masked(tensor, mask.reshape_as(tensor), rescale)


SPARSIFIERS = {"magnitude": magnitude, "random": random, "magnitude_outliers": magnitude_outliers}
