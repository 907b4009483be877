"""YAML for untrusted recipes and model cards: safe types only, no anchors or aliases, bounded size."""

from pathlib import Path
from typing import Any

import yaml

from merger.errors import MergerError, Problem, RecipeError


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors and aliases (they allow exponential 'billion laughs' documents)."""

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
        return super().compose_node(parent, index)


def load_recipe_text(text: str, *, source: str, max_bytes: int) -> Any:
    size = len(text.encode())
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
        raise RecipeError([Problem(str(path), f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})")]) from None
    raise RecipeError([Problem(str(path), f"recipe is {size} bytes, over the {max_bytes}-byte limit (MERGER_MAX_RECIPE_BYTES)")])


def load_recipe_file(path: Path, *, max_bytes: int) -> Any:
    return load_recipe_text(read_recipe_text(path, max_bytes=max_bytes), source=str(path), max_bytes=max_bytes)
