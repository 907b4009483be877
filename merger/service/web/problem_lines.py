"""The line of the recipe text a validation problem's field path points at, for the editor."""

import re

import yaml

LOC_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
# a plain mergekit config is checked as the first stage of a recipe: its paths start with this
PLAIN_CONFIG_PREFIX = re.compile(r"^stages\[0\]\.merge\.?")


def _parts(loc: str) -> list[str | int]:
    return [int(index) if index else key for key, index in LOC_PART.findall(loc)]


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        return next((value for key, value in node.value if isinstance(key, yaml.ScalarNode) and key.value == part), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None


def _line_in(root: yaml.Node, loc: str) -> int:
    """1-based line of the deepest node on the path (an unknown or missing field: its parent's line)."""
    node, line = root, root.start_mark.line
    for part in _parts(loc):
        node = _child(node, part)
        if node is None:
            break
        line = node.start_mark.line
    return line + 1


def problem_lines(text: str, locs: list[str]) -> list[int]:
    """The line of each field path in ``text``; where the text is not YAML, the line of its syntax error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: nothing is constructed
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return [mark.line + 1 if mark else 1 for _ in locs]
    if root is None:
        return [1 for _ in locs]
    plain = _child(root, "stages") is None
    return [_line_in(root, PLAIN_CONFIG_PREFIX.sub("", loc) if plain else loc) for loc in locs]
