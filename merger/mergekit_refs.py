"""Finding and replacing every model reference inside a mergekit config (``merger.merge_config``), wherever
mergekit allows one."""

from typing import Any, Callable, Iterator

from pydantic import BaseModel

from merger.merge_config import ModelReference


def walk_references(value: Any, loc: tuple = ()) -> Iterator[tuple[tuple, ModelReference]]:
    """(field path, reference) for each ModelReference in a validated mergekit config."""
    if isinstance(value, ModelReference):
        yield loc, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from walk_references(getattr(value, name), loc + (name,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from walk_references(item, loc + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_references(item, loc + (key,))


def map_references(value: Any, fn: Callable[[ModelReference], ModelReference]) -> Any:
    """A copy of a mergekit config with every ModelReference replaced by ``fn(reference)``."""
    if isinstance(value, ModelReference):
        return fn(value)
    if isinstance(value, BaseModel):
        update = {name: map_references(getattr(value, name), fn) for name in type(value).model_fields}
        return value.model_copy(update=update)
    if isinstance(value, list):
        return [map_references(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_references(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_references(v, fn) for k, v in value.items()}
    return value
