"""torch's CPU generator (mt19937) replayed with numba: DARE's Bernoulli masks drawn exactly as
``torch.bernoulli(torch.full(n, p))`` draws them on the CPU, several times faster, and draws skipped without
computing them. The generator's state goes in and out through ``torch.get_rng_state`` / ``set_rng_state``
(at::CPUGeneratorImplState: seed u64, left i32, seeded i32, next u64, then 624 state words as u64)."""

from functools import cache

import numba
import numpy as np
import torch

_N, _M = 624, 397
_LEFT, _NEXT, _WORDS = 8, 16, 24  # byte offsets in the state
_ONE = np.uint32(1)


@numba.njit(inline="always")
def _mix(mt, k, following, shifted):
    y = (mt[k] & np.uint32(0x80000000)) | (mt[following] & np.uint32(0x7FFFFFFF))
    mt[k] = mt[shifted] ^ np.uint32(y >> _ONE) ^ (np.uint32(0x9908B0DF) * (mt[following] & _ONE))


@numba.njit(inline="always")
def _twist(mt):
    # word k from words k, k + 1 and k + M (mod N), in order: three loops without the modulo, so that they vectorize
    for k in range(_N - _M):
        _mix(mt, k, k + 1, k + _M)
    for k in range(_N - _M, _N - 1):
        _mix(mt, k, k + 1, k + _M - _N)
    _mix(mt, _N - 1, 0, _M - 1)


@numba.njit(cache=True, nogil=True)
def _run(mt, position, count, threshold, out, one):
    """Advance ``count`` draws from (left, next) = position; with ``out``, out[i] = one if uniform < p else 0, where
    uniform is the draw's low 24 bits / 2**24 (so: low 24 bits < threshold). A draw first counts ``left`` down and
    twists the state when it reaches 0; here the draws between twists go in one loop (it vectorizes)."""
    left, following = position[0], position[1]
    keep = len(out) > 0
    done = 0
    while done < count:
        if left == 1:  # this draw twists, then reads word 0: as if N + 1 were left before it
            _twist(mt)
            left, following = _N + 1, 0
        n = min(count - done, left - 1)
        if keep:
            for i in range(n):
                y = mt[following + i]
                y ^= y >> np.uint32(11)
                y ^= np.uint32(y << np.uint32(7)) & np.uint32(0x9D2C5680)
                y ^= np.uint32(y << np.uint32(15)) & np.uint32(0xEFC60000)
                y ^= y >> np.uint32(18)
                out[done + i] = one if (y & np.uint32(0xFFFFFF)) < threshold else 0
        left -= n
        following += n
        done += n
    position[0], position[1] = left, following


class Stream:
    """The generator as a state captured from torch, drawn from run by run."""

    def __init__(self, state: torch.Tensor):
        raw = state.numpy()
        self.state = state.clone()
        self.words = np.ascontiguousarray(raw[_WORDS:_WORDS + 8 * _N].view(np.uint64).astype(np.uint32))
        self.position = np.array([raw[_LEFT:_LEFT + 4].view(np.int32)[0], raw[_NEXT:_NEXT + 8].view(np.uint64)[0]], dtype=np.int64)

    def bernoulli(self, count: int, density: float, dtype: torch.dtype) -> torch.Tensor:
        """What torch.bernoulli(torch.full((count,), density, dtype=dtype)) returns from this state."""
        p = float(torch.tensor(density, dtype=dtype).float())  # the probability as the kernel reads it
        threshold = np.uint32(min(max(np.ceil(p * 2**24), 0), 2**24))  # low24 / 2**24 < p  <=>  low24 < ceil(p * 2**24)
        out = torch.empty(count, dtype=dtype)
        if dtype == torch.bfloat16:  # 1.0 as bits
            _run(self.words, self.position, count, threshold, out.view(torch.uint16).numpy(), np.uint16(0x3F80))
        else:  # float32, the other dtype DARE draws in on the CPU
            _run(self.words, self.position, count, threshold, out.numpy(), np.float32(1))
        return out

    def skip(self, count: int) -> None:
        _run(self.words, self.position, count, np.uint32(0), np.empty(0, dtype=np.uint16), np.uint16(0))

    def copy(self) -> "Stream":
        return Stream(self.torch_state())

    def torch_state(self) -> torch.Tensor:
        raw = self.state.numpy().copy()
        raw[_WORDS:_WORDS + 8 * _N] = self.words.astype(np.uint64).view(np.uint8)
        raw[_LEFT:_LEFT + 4] = np.array([self.position[0]], dtype=np.int32).view(np.uint8)
        raw[_NEXT:_NEXT + 8] = np.array([self.position[1]], dtype=np.uint64).view(np.uint8)
        return torch.from_numpy(raw)


@cache
def replays_torch() -> bool:
    """Whether this torch draws as the replay does (checked once per process, on a saved and restored generator
    state): the replay follows torch 2.13's CPU kernels, and another torch may draw otherwise."""
    saved = torch.get_rng_state()
    try:
        torch.manual_seed(20261201)
        start = torch.get_rng_state()
        for dtype in (torch.float32, torch.bfloat16):
            torch.set_rng_state(start)
            if not torch.equal(Stream(start).bernoulli(4099, 0.3, dtype), torch.bernoulli(torch.full((4099,), 0.3, dtype=dtype))):
                return False
        return True
    finally:
        torch.set_rng_state(saved)
