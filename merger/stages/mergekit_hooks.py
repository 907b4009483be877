"""mergekit has no progress or cancel hooks; its graph executor yields each finished target, so merger
observes that by swapping the executor class a mergekit entry point uses, for the duration of a call."""

import warnings
from contextlib import contextmanager
from types import ModuleType

from mergekit.io.tasks import LoaderCache
from transformers.utils import logging as hf_logging

from merger.errors import Cancelled
from merger.progress import CancelCheck, ProgressEvent, Reporter


@contextmanager
def observed(module: ModuleType, stage: str, report: Reporter, should_cancel: CancelCheck, unit: str = "tensors"):
    """Within the block, ``module.Executor`` reports each finished target and raises Cancelled on request."""
    original = module.Executor

    class ObservedExecutor(original):
        def run(self, quiet: bool = False, desc: str | None = None):
            total = len(self.targets)
            report(ProgressEvent(stage, "progress", 0, total, unit))
            for done, item in enumerate(super().run(quiet=True, desc=desc), start=1):
                report(ProgressEvent(stage, "progress", done, total, unit))
                if should_cancel():
                    raise Cancelled(f"stage {stage} cancelled")
                yield item

    module.Executor = ObservedExecutor
    LoaderCache.loaders.clear()  # process-wide; would serve stale weights for a rewritten path
    try:
        with _quiet_transformers():
            yield
    finally:
        module.Executor = original
        LoaderCache.loaders.clear()


@contextmanager
def _quiet_transformers():
    """transformers' own progress bars and deprecation chatter would interleave with merger's progress."""
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.enable_progress_bar()
