"""A quickselect that follows libstdc++'s ``std::sort`` (introsort, descending) exactly, compiled with numba.

It performs the same median-of-three pivot choices and Hoare partitions std::sort performs, but only on the
partitions that contain position k, so it costs O(n) instead of a full sort while moving elements exactly as
the sort would. Afterwards positions [0, first) hold elements the sort puts before k, and [first, last) (at
most 16 elements) is the range std::sort's final insertion sort orders stably.
"""

import numba
import numpy as np

INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold
DEPTH_EXHAUSTED = -1


@numba.njit(cache=True, nogil=True)
def _swap(values, index, i, j):
    values[i], values[j] = values[j], values[i]
    index[i], index[j] = index[j], index[i]


@numba.njit(cache=True, nogil=True)
def _move_median_to_first(values, index, result, a, b, c):
    # the comparator is "sorts before": greater than, for a descending sort
    if values[a] > values[b]:
        if values[b] > values[c]:
            _swap(values, index, result, b)
        elif values[a] > values[c]:
            _swap(values, index, result, c)
        else:
            _swap(values, index, result, a)
    elif values[a] > values[c]:
        _swap(values, index, result, a)
    elif values[b] > values[c]:
        _swap(values, index, result, c)
    else:
        _swap(values, index, result, b)


@numba.njit(cache=True, nogil=True)
def _partition(values, index, first, last):
    """__unguarded_partition_pivot: pivot moved to ``first``, Hoare partition of (first, last)."""
    _move_median_to_first(values, index, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = values[first]
    left, right = first + 1, last
    while True:
        while values[left] > pivot:
            left += 1
        right -= 1
        while pivot > values[right]:
            right -= 1
        if left >= right:
            return left
        _swap(values, index, left, right)
        left += 1


@numba.njit(cache=True, nogil=True)
def select(values: np.ndarray, index: np.ndarray, k: int) -> tuple[int, int]:
    """Partition ``values`` (and ``index`` alongside) as std::sort would around position k: (first, last),
    or (DEPTH_EXHAUSTED, 0) where std::sort would have switched to heapsort on that range."""
    first, last = 0, len(values)
    depth = 0
    size = last
    while size > 1:
        size >>= 1
        depth += 2  # 2 * floor(log2(n))
    while last - first > INSERTION_THRESHOLD:
        if depth == 0:
            return DEPTH_EXHAUSTED, 0
        depth -= 1
        cut = _partition(values, index, first, last)
        if cut <= k:
            first = cut
        else:
            last = cut
        if first == k:
            break
    return first, last


@numba.njit(cache=True, nogil=True)
def mark(index: np.ndarray, start: int, stop: int, mask: np.ndarray) -> None:
    """mask[index[start:stop]] = True."""
    for i in range(start, stop):
        mask[index[i]] = True
