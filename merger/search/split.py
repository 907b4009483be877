"""The honest split: each task file's test lines are held back; the rest is the search's data.

Lines are numbered from 1 in file order, counting examples (blank lines are skipped, so in a file without
blank lines an example's number is its line number). The search's lines are split once more, by a seeded
shuffle, into lines it trains on and lines it chooses its best step or trial on.
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path

from merger.evaluation.datasets import DataError, Generation, read_examples

RANGES = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")


@dataclass(frozen=True)
class Line:
    number: int
    example: Generation


@dataclass(frozen=True)
class TaskSplit:
    label: str
    train: list[Line]  # the search fits its parameters on these
    choose: list[Line]  # and picks its best step (or trial) on these
    test: list[Line]  # never scored during the search

    @property
    def search_numbers(self) -> set[int]:
        return {line.number for line in self.train + self.choose}


def parse_lines(text: str) -> frozenset[int]:
    """``"1-50"`` or ``"1-10, 20, 30-35"``: the line numbers named (from 1, ranges inclusive)."""
    if not RANGES.match(text):
        raise ValueError(f"{text!r} is not a list of line numbers and ranges such as 1-50 or 1-10,20")
    numbers: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        start, end = int(first), int(last or first)
        if start < 1 or end < start:
            raise ValueError(f"{part.strip()!r}: a range runs from line 1 or later to a line not before its start")
        numbers.update(range(start, end + 1))
    return frozenset(numbers)


def split_task(path: Path, label: str, test_lines: frozenset[int], *, choose_fraction: float, seed: int) -> TaskSplit:
    examples = read_examples(path)
    if not all(isinstance(e, Generation) for e in examples):
        raise DataError(f"{path}: a search scores prompt/answer examples; multiple-choice files are not supported")
    lines = [Line(number, example) for number, example in enumerate(examples, start=1)]
    test = [line for line in lines if line.number in test_lines]
    search = [line for line in lines if line.number not in test_lines]
    if len(search) < 2:
        raise DataError(f"{path}: {len(search)} line(s) left for the search once the test lines are held back; it needs 2 or more")
    random.Random(seed).shuffle(search)
    chosen = min(len(search) - 1, max(1, round(len(search) * choose_fraction))) if choose_fraction > 0 else 0
    choose, train = sorted(search[:chosen], key=_number), sorted(search[chosen:], key=_number)
    return TaskSplit(label, train, choose, test)


def _number(line: Line) -> int:
    return line.number
