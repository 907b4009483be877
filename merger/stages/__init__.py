"""The runners of the stage kinds: the closed table the orchestrator dispatches on.

A runner module provides ``plan(stage, loc, context) -> (StagePlan | None, [Problem])`` (resolve and
check, no heavy work) and, for a kind that makes a model, ``run(plan, inputs, out_dir, work_dir, report,
should_cancel) -> StageOutput``; for one that doesn't (``evaluate``), ``evaluate(plan, models, store, ...)``.
"""

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

KINDS = ("merge", "adapters", "extract_lora", "quantize", "evaluate", "search")


class _Runners(Mapping[str, ModuleType]):
    """Each kind's module, imported when first asked for: checking a recipe imports only its kinds (a merge
    stage needs mergekit and torch, an adapters stage neither)."""

    def __getitem__(self, kind: str) -> ModuleType:
        if kind not in KINDS:
            raise KeyError(kind)
        return importlib.import_module(f"merger.stages.{kind}")

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


STAGE_RUNNERS = _Runners()
