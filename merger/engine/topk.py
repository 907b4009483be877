"""The set ``torch.argsort(w, descending=True)[:k]`` selects, without sorting.

torch's CPU sort is libstdc++'s ``std::sort`` (introsort) on (value, index) pairs compared by value only, so
elements that tie at the k-th largest value are chosen in an order that is deterministic but not index order.
When no tie straddles the cut, the set is simply ``w >= kth value``. When one does, this module replays the
introsort partitions that contain position k (a quickselect on the same pivots, each Hoare partition done with
vector operations), which yields exactly the elements std::sort puts before position k. Should the replay reach
introsort's depth limit (where it would switch to heapsort), the caller's argsort decides instead.
"""


import torch

_INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


def argsort_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's own way: a full descending argsort."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask


def top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat) of the k elements ``torch.argsort(w, descending=True)[:k]`` picks; ``w`` flat float."""
    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    if w.device.type != "cpu" or w.dtype != torch.float32 or n >= 2**31:
        return argsort_mask(w, k)
    codes = w.view(torch.int32)  # magnitudes are >= 0, so their bit patterns sort like their values
    found = _kth_largest_code(codes, k)
    if found is None:  # NaN
        return argsort_mask(w, k)
    kth, above, tied = found
    if above + tied == k:
        return codes >= kth
    return _replay(w, k)


def _kth_largest_code(codes: torch.Tensor, k: int) -> tuple[int, int, int] | None:
    """The k-th largest code, how many codes are larger and how many equal it: two 16-bit histograms."""
    high = codes >> 16
    if int(high.max()) > 0x7F80 or int(high.min()) < 0:  # NaN, or a negative zero's sign bit
        return None
    counts = torch.bincount(high, minlength=0x7F81)
    bucket, above = _crossing(counts, k)
    low = torch.bincount(codes[high == bucket] & 0xFFFF, minlength=0x10000)
    value, above_in_bucket = _crossing(low, k - above)
    return (bucket << 16) | value, above + above_in_bucket, int(low[value])


def _crossing(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th element counted from the top, and how many elements lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))  # first cumulative count >= k
    return len(counts) - 1 - position, int(from_top[position - 1]) if position else 0


def _replay(w: torch.Tensor, k: int) -> torch.Tensor:
    values = w.clone()
    index = torch.arange(w.numel(), dtype=torch.int32)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    first, last = 0, w.numel()
    depth = 2 * (last.bit_length() - 1)
    while last - first > _INSERTION_THRESHOLD:
        if depth == 0:
            return argsort_mask(w, k)
        depth -= 1
        cut = _partition(values, index, first, last)
        if cut <= k:
            mask[index[first:cut].long()] = True  # everything left of the cut sorts before position k
            first = cut
        else:
            last = cut
        if first == k:
            return mask
    # the final insertion sort is stable: ties keep their current order inside [first, last)
    order = torch.sort(values[first:last], descending=True, stable=True).indices
    mask[index[first:last][order[: k - first]].long()] = True
    return mask


def _partition(values: torch.Tensor, index: torch.Tensor, first: int, last: int) -> int:
    """libstdc++'s __unguarded_partition_pivot on [first, last) for a descending comparator; returns the cut."""
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    va, vb, vc = (float(values[i]) for i in (a, b, c))
    if va > vb:
        median = b if vb > vc else c if va > vc else a
    else:
        median = a if va > vc else c if vb > vc else b
    _swap(values, index, first, median)
    pivot = values[first]
    segment = values[first + 1:last]
    # the left scan stops on elements not before the pivot, the right scan on elements not after it (and on
    # the pivot itself, at `first`); the i-th stops of the two scans are swapped while they have not crossed
    lefts = torch.nonzero(segment <= pivot).flatten()
    rights = torch.nonzero(segment >= pivot).flatten()

    def right_stop(i: int) -> int:  # relative to first + 1; -1 is the pivot
        return int(rights[len(rights) - 1 - i]) if i < len(rights) else -1

    low, high = 0, min(len(lefts), len(rights))
    while low < high:  # swaps happen for a prefix of the pairs: lefts rise, rights fall
        middle = (low + high) // 2
        if int(lefts[middle]) < right_stop(middle):
            low = middle + 1
        else:
            high = middle
    swaps, offset = low, first + 1
    if not swaps:
        return int(lefts[0]) + offset
    left = lefts[:swaps] + offset
    right = rights[len(rights) - swaps:].flip(0) + offset
    values[left], values[right] = values[right], values[left]
    index[left], index[right] = index[right], index[left]
    # the scan that ends the partition meets either the next original stopper or the last swapped slot
    last_swapped = right_stop(swaps - 1)
    return (min(int(lefts[swaps]), last_swapped) if swaps < len(lefts) else last_swapped) + offset


def _swap(values: torch.Tensor, index: torch.Tensor, i: int, j: int) -> None:
    if i != j:
        values[[i, j]] = values[[j, i]]
        index[[i, j]] = index[[j, i]]
