"""YAML for untrusted recipes and model cards: safe types only, no anchors or aliases, bounded size and depth."""

from pathlib import Path
from typing import Any

import yaml

from merger.errors import MergerError, Problem, RecipeError

# mappings and lists nested deeper than this are refused (a real recipe nests about 8 levels); the limit keeps
# every later recursive walk (pydantic, json.dumps, the API's renderers) far from Python's recursion limit
MAX_DEPTH = 32
DEPTH_MESSAGE = f"nests mappings and lists deeper than {MAX_DEPTH} levels (the limit)"


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors and aliases (they allow exponential 'billion laughs' documents) and
    collections nested deeper than MAX_DEPTH (PyYAML composes them recursively)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed", event.start_mark
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(
                None, None, "YAML anchors are not allowed", event.start_mark
            )
        nests = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if nests and self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, DEPTH_MESSAGE, event.start_mark)
        self._depth += nests
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nests


def nesting_depth(value: Any) -> int:
    """How deeply mappings and lists nest in ``value`` (a scalar: 0), without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


def load_recipe_text(text: str, *, source: str, max_bytes: int) -> Any:
    size = len(text.encode(errors="surrogatepass"))
    if size > max_bytes:
        raise RecipeError([Problem(source, f"recipe is {size} bytes, over the {max_bytes}-byte limit (MERGER_MAX_RECIPE_BYTES)")])
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - the loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(source, f"not valid recipe YAML: {exc}")]) from None


def load_untrusted_yaml(text: str, *, source: str) -> Any:
    """YAML other than a recipe (a model card's front matter); errors name ``source``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - the loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise MergerError(f"{source}: not valid YAML: {exc}") from None


def read_recipe_text(path: Path, *, max_bytes: int) -> str:
    """A recipe file's text; a missing, unreadable, oversized or non-UTF-8 file is an error naming it."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MergerError(f"{path}: cannot read recipe: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(str(path), f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})")]) from None
    raise RecipeError([Problem(str(path), f"recipe is {size} bytes, over the {max_bytes}-byte limit (MERGER_MAX_RECIPE_BYTES)")])


def load_recipe_file(path: Path, *, max_bytes: int) -> Any:
    return load_recipe_text(read_recipe_text(path, max_bytes=max_bytes), source=str(path), max_bytes=max_bytes)
