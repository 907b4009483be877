"""lm-evaluation-harness tasks from a local task YAML and local data (the ``lm-eval`` extra).

The YAML is one task, read with a safe loader: no ``!function`` (code), no ``include`` or ``class``; its
``dataset_path`` is a local file format (json, csv, text, parquet, arrow) and its
``dataset_kwargs.data_files`` name files relative to the YAML, which must lie where every other input
may (``confine``). Templates render in a sandboxed Jinja environment. The model is the transformers
model merger loaded (lm-eval's ``hf`` model, given the model object), so nothing is downloaded.
"""

import importlib.util
import io
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from merger.evaluation.datasets import LM_EVAL, DataError, DataFile
from merger.evaluation.metrics import Measured, Step
from merger.hashing import digest_json, sha256_file

LOCAL_FORMATS = frozenset({"json", "csv", "text", "parquet", "arrow"})
REFUSED_KEYS = {"include": "other YAML files", "class": "Python classes", "group": "task groups"}


@dataclass(frozen=True)
class HarnessTask:
    config: dict  # the task config with absolute data paths
    sha256: str  # of the YAML and every data file

    @property
    def name(self) -> str:
        return self.config["task"]


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def task_file(path: Path, label: str, confine: Callable[[str, Path], Path]) -> DataFile:
    if not available():
        raise DataError(f"{path}: lm-eval tasks need lm-evaluation-harness: pip install -e .[lm-eval]")
    task = read_task(path, confine)
    return DataFile(label, path, LM_EVAL, task.sha256, task)


def read_task(path: Path, confine: Callable[[str, Path], Path]) -> HarnessTask:
    """Check a task YAML; ``confine(text, relative_to)`` resolves a data file path or raises."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        hint = " (!function tags name Python code, which merger never imports)" if "!function" in str(exc) else ""
        raise DataError(f"{path}: not a task YAML merger accepts: {exc}{hint}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise DataError(f"{path}: an lm-eval task YAML is a mapping with a `task` name")
    for key, what in REFUSED_KEYS.items():
        if key in config:
            raise DataError(f"{path}: `{key}` ({what}) is not supported; write one self-contained task")
    if config.get("dataset_path") not in LOCAL_FORMATS:
        raise DataError(f"{path}: dataset_path must be a local format ({', '.join(sorted(LOCAL_FORMATS))}) with "
                        "dataset_kwargs.data_files; merger never downloads data sets")
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if not files:
        raise DataError(f"{path}: dataset_kwargs.data_files names no files")
    digests = {"yaml": sha256_file(path)}

    def local(text) -> str:
        if not isinstance(text, str):
            raise DataError(f"{path}: data_files entries must be paths")
        resolved = confine(text, path.parent)
        if not resolved.is_file():
            raise DataError(f"{path}: data file {text} not found")
        digests[text] = sha256_file(resolved)
        return str(resolved)

    if isinstance(files, dict):
        kwargs["data_files"] = {split: [local(f) for f in _as_list(names)] for split, names in files.items()}
    else:
        kwargs["data_files"] = [local(f) for f in _as_list(files)]
    return HarnessTask({**config, "dataset_kwargs": kwargs}, digest_json(digests))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def run_task(model, tokenizer, task: HarnessTask, *, limit: int | None, batch_size: int, cache_dir: Path, step: Step) -> Measured:
    """Evaluate a transformers model on one task; lm-eval reports no progress inside a task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    config = {**task.config, "dataset_kwargs": {**task.config["dataset_kwargs"], "cache_dir": str(cache_dir)}}
    step(0, 1)
    started = time.perf_counter()
    with _sandboxed_templates(), _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = simple_evaluate(model=lm, tasks=[config], limit=limit, task_manager=TaskManager(include_defaults=False),
                              log_samples=False, bootstrap_iters=0)
    step(1, 1)
    results = out["results"][task.name]
    metrics = {k: v for k, v in results.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    if not metrics:
        raise DataError(f"lm-eval task {task.name} produced no metric")
    values = {"metrics": metrics, "primary": next(iter(metrics)), "documents": results.get("sample_len")}
    return Measured(values, 0, time.perf_counter() - started)


def versions() -> dict[str, str]:
    return {"lm_eval": version("lm_eval")}


@contextmanager
def _quiet():
    """lm-eval logs, draws progress bars, runs git and collects the environment for its own report: none of that."""
    import datasets
    from lm_eval import evaluator

    level = logging.getLogger("lm_eval").level
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    originals = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda _results: None)
    try:
        with redirect_stderr(io.StringIO()):  # tqdm bars
            yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = originals
        datasets.enable_progress_bars()
        logging.getLogger("lm_eval").setLevel(level)


@contextmanager
def _sandboxed_templates():
    """lm-eval renders doc_to_text & co with a plain Jinja environment; a sandbox keeps templates from code."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment
    from lm_eval import utils

    original = utils.env
    sandbox = SandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    sandbox.filters.update(original.filters)
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = original
