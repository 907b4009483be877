"""Where merger computes: the ``device`` setting (cpu, or cuda[:N]) resolved against what this machine has, so
that one recipe runs on a GPU worker and on a CPU-only one alike."""

import torch


def resolve(device: str) -> str:
    """``device`` where torch can use it; cpu where this machine has no such GPU."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return "cpu"
    return device
