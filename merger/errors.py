"""Errors that carry every problem found, each with the field path or file it concerns."""

import re
from dataclasses import dataclass

UNENCODABLE = re.compile("[\x00\ud800-\udfff]")  # NUL (no database text takes it) and lone surrogates (no UTF-8)


def escape_unencodable(text: str) -> str:
    """``text`` with each NUL or lone surrogate written as its escape (``\\x00``, ``\\ud800``)."""
    return UNENCODABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class Problem:
    """One problem at a field path; neither may hold a NUL or a lone surrogate (they echo user input)."""

    loc: str
    msg: str

    def __post_init__(self):
        object.__setattr__(self, "loc", escape_unencodable(self.loc))
        object.__setattr__(self, "msg", escape_unencodable(self.msg))

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
