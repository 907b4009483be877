"""TIES's combining step on two bfloat16 task vectors fused into one compiled loop that rounds exactly where
torch's CPU kernels round: each torch op computes in float32 and rounds its result to bfloat16 (nearest, ties to
even); sums over the models' axis accumulate from +0.0, in model order.

Finite results only: a NaN anywhere (whose bits torch's vectorized and scalar paths spell differently) makes a
loop decline, and the torch ops run instead. Serial loops on purpose: a numba ``parallel`` loop changed the
OpenMP thread count torch's later reductions ran with, and DARE's rescaling sums (single-threaded in mergekit
-j 1) came out different; tensors merged at once run it in separate threads instead (it releases the GIL)."""

import numba
import numpy as np
import torch

_ZERO, _ONE = np.float32(0.0), np.float32(1.0)


@numba.njit(inline="always")
def _widen(bits: np.uint16) -> np.float32:
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@numba.njit(inline="always")
def _round(value: np.float32) -> np.float32:
    bits = np.float32(value).view(np.uint32)
    bits = np.uint32((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return bits.view(np.float32)


@numba.njit(cache=True, nogil=True)
def _ties_combine(first, second, base, weight_first, weight_second, normalize, out) -> bool:
    failed = 0
    for j in range(len(out)):
        a = _round(_widen(first[j]) * weight_first)  # deltas.mul_(weights)
        b = _round(_widen(second[j]) * weight_second)
        positive = _round(_ZERO + a + b) >= _ZERO  # the elected sign: sum >= 0
        keep_a = a > _ZERO if positive else a < _ZERO  # sign == majority
        keep_b = b > _ZERO if positive else b < _ZERO
        mixed = _round(_ZERO + (a if keep_a else a * _ZERO) + (b if keep_b else b * _ZERO))
        if normalize:
            divisor = _round(_ZERO + (weight_first if keep_a else weight_first * _ZERO)
                             + (weight_second if keep_b else weight_second * _ZERO))
            mixed = _round(mixed / (_ONE if divisor == _ZERO else divisor))
        result = _round(_widen(base[j]) + mixed)
        if result != result:
            failed += 1
        out[j] = np.uint16(np.float32(result).view(np.uint32) >> np.uint32(16))
    return failed == 0


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.uint16).numpy()


def ties_combine(deltas, base, weights, normalize: bool):
    """base + TIES's mix of two bfloat16 task vectors (rows of ``deltas``), or None where torch must decide."""
    out = base.new_empty(base.shape)
    w = weights.reshape(-1).float().numpy()
    if _ties_combine(_bits(deltas[0].contiguous()), _bits(deltas[1].contiguous()), _bits(base.contiguous()), w[0], w[1], normalize, _bits(out)):
        return out
    return None
