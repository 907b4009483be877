"""merger's own merge engine: the common mergekit methods, streamed tensor by tensor with bounded memory and
bit-identical to ``mergekit-yaml``. ``prepare`` is the one predicate: it returns a plan, or raises Unsupported
(with the reason) for anything the engine does not reproduce exactly, which mergekit then runs."""

from pathlib import Path

import torch

from merger.engine.config import Unsupported, parse
from merger.engine.run import MergePlan, execute, plan


def prepare(merge_config: dict, dirs: dict[str, Path]) -> MergePlan:
    """A plan for a mergekit config whose model names map to directories in ``dirs``; Unsupported otherwise."""
    config = parse(merge_config)
    if config.method.randomized:
        from merger.engine.draws import replays_torch  # numba, on first use

        if not replays_torch():
            raise Unsupported(f"torch {torch.__version__} draws random masks otherwise than merger's replay of its generator")
    if missing := [m for m in config.models if m not in dirs]:
        raise Unsupported(f"models {missing} are not plain directories")
    return plan(config, {m: dirs[m] for m in config.models})


__all__ = ["MergePlan", "Unsupported", "execute", "prepare"]
