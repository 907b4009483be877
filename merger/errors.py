"""Errors that carry every problem found, each with the field path or file it concerns."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


class MergerError(Exception):
    """An error a user can act on; the CLI prints it without a traceback."""


class RecipeError(MergerError):
    """A recipe failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StageFailed(MergerError):
    """A stage's engine failed; the message names the stage and the cause."""


class Cancelled(MergerError):
    """A job was cancelled while it ran."""


def format_loc(loc: tuple[str | int, ...]) -> str:
    """("stages", 0, "merge", "models") -> "stages[0].merge.models"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
