"""The set ``torch.argsort(w.float(), descending=True)[:k]`` selects (mergekit's TIES top-k), without sorting.

torch's CPU sort is libstdc++'s ``std::sort`` (introsort) on (value, index) pairs compared by value only, so
elements that tie at the k-th largest value are chosen in an order that is deterministic but not index order,
and in bf16 many magnitudes tie at any cut. ``introsort.select`` replays the partitions std::sort makes that
contain position k, which yields exactly the elements it puts before k, in O(n) time and without the int64
index array a sort needs. Where the replay would reach introsort's depth limit (heapsort), and off the CPU, an
argsort decides, as in mergekit.
"""

import torch

# magnitudes (>= 0) of 16-bit floats sort like their bit patterns read as int16
_AS_CODES = (torch.bfloat16, torch.float16)


def argsort_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's own way: a full descending argsort of the float32 magnitudes."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.argsort(w.float(), descending=True)[:k]] = True
    return mask


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat) of the k elements mergekit keeps of these flat, non-negative magnitudes, which it uses
    as scratch space (their order is scrambled)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if magnitudes.device.type != "cpu" or n >= 2**31 or torch.isnan(magnitudes.amax()):
        return argsort_mask(magnitudes, k)
    from merger.engine.introsort import DEPTH_EXHAUSTED, mark, select  # numba compiles (or loads its cache) on first use

    values = magnitudes.view(torch.int16) if magnitudes.dtype in _AS_CODES else magnitudes.float()
    index = torch.arange(n, dtype=torch.int32)
    first, last = select(values.numpy(), index.numpy(), k)
    if first == DEPTH_EXHAUSTED:
        restored = torch.empty_like(magnitudes)
        restored[index.long()] = magnitudes
        return argsort_mask(restored, k)
    mask = torch.zeros(n, dtype=torch.bool)
    mark(index.numpy(), 0, first, mask.numpy())
    # std::sort ends with an insertion sort, stable: ties keep their current order inside [first, last)
    order = torch.sort(values[first:last], descending=True, stable=True).indices
    mask[index[first:last][order[: k - first]].long()] = True
    return mask
