"""Evaluation data files: what each holds, read and checked before any model is loaded.

- ``*.txt`` (perplexity): UTF-8 text.
- task JSONL, one example a line: ``{"prompt", "answer"}`` (greedy generation must start with the answer)
  or ``{"prompt", "choices": [...], "answer": index}`` (multiple choice by log-likelihood); one kind a file.
- an lm-evaluation-harness task YAML with local data (see ``merger.evaluation.harness``).

Every problem names the file, and for JSONL the line.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import MergerError
from merger.hashing import sha256_file

PERPLEXITY, GENERATION, CHOICE, LM_EVAL = "perplexity", "task_accuracy", "multiple_choice", "lm_eval"
KL_DIVERGENCE = "kl_divergence"  # measured on a perplexity text: a quantized model against its unquantized source


class DataError(MergerError):
    """An evaluation data file that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class DataFile:
    """One file to evaluate on: ``label`` as given (shown in tables), ``path`` resolved, its metric and digest."""

    label: str
    path: Path
    metric: str
    sha256: str
    harness_task: Any = None  # lm-eval only: the checked task (merger.evaluation.harness.HarnessTask)


@dataclass(frozen=True)
class Generation:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Choice:
    prompt: str
    choices: tuple[str, ...]
    answer: int


def text_file(path: Path, label: str) -> DataFile:
    read_text(path)
    return DataFile(label, path, PERPLEXITY, sha256_file(path))


def task_file(path: Path, label: str) -> DataFile:
    examples = read_examples(path)
    return DataFile(label, path, CHOICE if isinstance(examples[0], Choice) else GENERATION, sha256_file(path))


def read_text(path: Path) -> str:
    text = _read(path)
    if not text.strip():
        raise DataError(f"{path}: empty text file")
    return text


def read_examples(path: Path, limit: int | None = None) -> list[Generation | Choice]:
    """Every example of a task JSONL file (the first ``limit``), all of one kind."""
    examples: list[Generation | Choice] = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        example = _example(line, f"{path}:{number}")
        if examples and type(example) is not type(examples[0]):
            raise DataError(f"{path}:{number}: a {_kind(example)} example in a file of {_kind(examples[0])} examples")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples[:limit] if limit else examples


def _example(line: str, where: str) -> Generation | Choice:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
        raise DataError(f'{where}: expected an object with a string "prompt"')
    if "choices" in raw:
        choices, answer = raw["choices"], raw.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f'{where}: "choices" must be a list of two or more non-empty strings')
        if type(answer) is not int or not 0 <= answer < len(choices):
            raise DataError(f'{where}: "answer" must be the index of the right choice (0 to {len(choices) - 1})')
        return Choice(raw["prompt"], tuple(choices), answer)
    if not isinstance(raw.get("answer"), str) or not raw["answer"]:
        raise DataError(f'{where}: expected a non-empty string "answer" (or "choices" and an answer index)')
    return Generation(raw["prompt"], raw["answer"])


def _kind(example: Generation | Choice) -> str:
    return "multiple-choice" if isinstance(example, Choice) else "prompt/answer"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
