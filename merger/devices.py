"""Where merger computes: the ``device`` setting (cpu, or cuda[:N]) resolved against what this machine has, so
that one recipe runs on a GPU worker and on a CPU-only one alike; and the CPU cores idle now.

On 2 cores that other work keeps busy (load 6), a forward pass with 2 OpenMP threads, each waiting at every
barrier for the other to get a core, took 10x the wall time of one thread (and 8x the CPU time)."""

import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def resolve(device: str) -> str:
    """``device`` where torch can use it; cpu where this machine has no such GPU."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return "cpu"
    return device


def idle_cores(samples: int = 3) -> int:
    """The cores no other runnable task wants now (at least one): what torch's thread count should be."""
    cores = len(os.sched_getaffinity(0))
    try:
        running = []
        for _ in range(samples):  # /proc/loadavg's 4th field: runnable tasks now (this one included) / all
            running.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            time.sleep(0.01)
    except (OSError, IndexError, ValueError):  # not Linux
        return cores
    return max(1, min(cores, cores + 1 - round(statistics.median(running))))


@contextmanager
def torch_threads(count: int | None):
    """torch's thread count set to ``count`` (None: left as it is) inside the block, and back as it was after."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
