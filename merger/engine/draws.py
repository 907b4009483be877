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
def _twist(mt):
    for k in range(_N):
        y = (mt[k] & np.uint32(0x80000000)) | (mt[(k + 1) % _N] & np.uint32(0x7FFFFFFF))
        value = mt[(k + _M) % _N] ^ np.uint32(y >> _ONE)
        if mt[(k + 1) % _N] & _ONE:
            value ^= np.uint32(0x9908B0DF)
        mt[k] = value


@numba.njit(cache=True, nogil=True)
def _run(mt, position, count, threshold, out):
    """Advance ``count`` draws from (left, next) = position; with ``out``, out[i] = uniform < p, where uniform is
    the draw's low 24 bits / 2**24 (so: low 24 bits < threshold)."""
    left, following = position[0], position[1]
    keep = len(out) > 0
    for i in range(count):
        left -= 1
        if left == 0:
            _twist(mt)
            left, following = _N, 0
        if keep:
            y = mt[following]
            y ^= y >> np.uint32(11)
            y ^= np.uint32(y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= np.uint32(y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            out[i] = (y & np.uint32(0xFFFFFF)) < threshold
        following += 1
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
        out = np.empty(count, dtype=np.bool_)
        _run(self.words, self.position, count, threshold, out)
        return torch.from_numpy(out).to(dtype)

    def skip(self, count: int) -> None:
        _run(self.words, self.position, count, np.uint32(0), np.empty(0, dtype=np.bool_))

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
