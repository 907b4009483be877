"""Progress events, emitted by the orchestrator and rendered by the CLI, the API and the worker."""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    phase: str  # "start" | "progress" | "done"
    done: int = 0
    total: int = 0
    unit: str = "tensors"
    model_id: str | None = None
    cache_hit: bool = False
    best: float | None = None  # a search's best objective so far


Reporter = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


def no_report(_event: ProgressEvent) -> None:
    pass


def never_cancel() -> bool:
    return False
