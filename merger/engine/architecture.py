"""The output tensors mergekit plans for a model, read from mergekit's own architecture definitions (JSON data
files in its package; nothing of mergekit is imported).

Only single-module ("module" kind) definitions are used; anything else is left to mergekit.
"""

import importlib.util
import json
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# mergekit builds these two from code, not from their JSON files
CODED_ARCHITECTURES = frozenset({"AfmoeForCausalLM", "Glm4MoeForCausalLM"})
_WEIGHT_KEYS = frozenset({"name", "vocabulary_axis", "optional", "aliases", "tied_names"})


class UnsupportedArchitecture(ValueError):
    """mergekit would plan this model in a way the engine does not follow."""


@dataclass(frozen=True)
class PlannedWeight:
    name: str
    optional: bool
    aliases: tuple[str, ...]
    t: float  # the position mergekit interpolates gradient parameters at


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"


def _substitute(text: str, num_layers: int, layer: int | None) -> str:
    if "{" not in text:
        return text
    values = {"num_layers": num_layers, "num_layers+1": num_layers + 1, "num_layers-1": num_layers - 1}
    if layer is not None:
        values |= {"layer_index": layer, "layer_index+1": layer + 1, "layer_index-1": layer - 1}
    return _Template(text).substitute(values)


@cache
def _definitions() -> dict[str, list[dict]]:
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "architectures"
    by_name: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        for name in data.get("architectures", []):
            by_name.setdefault(name, []).append(data)
    return by_name


def definition_for(config: dict) -> dict:
    """The JSON definition mergekit picks for a model's config.json."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise UnsupportedArchitecture(f"config names {len(architectures)} architectures")
    name = architectures[0]
    if name in CODED_ARCHITECTURES:
        raise UnsupportedArchitecture(f"{name} is defined in mergekit's code")
    candidates = _definitions().get(name, [])
    if len(candidates) > 1:
        candidates = [c for c in candidates if c.get("model_type") == config.get("model_type")]
    if len(candidates) != 1:
        raise UnsupportedArchitecture(f"no single mergekit definition for {name}")
    definition = candidates[0]
    if definition.get("kind", "module") != "module" or definition.get("override_num_layers") is not None:
        raise UnsupportedArchitecture(f"{name}: a modular or fixed-depth definition")
    return definition


def planned_weights(config: dict) -> list[PlannedWeight]:
    """Pre-layer, per-layer and post-layer weights in mergekit's planning order, with each one's ``t``."""
    definition = definition_for(config)
    key = definition.get("num_layers_config_key")
    if not key or not isinstance(config.get(key), int):
        raise UnsupportedArchitecture(f"config.json has no integer {key!r}")
    num_layers = config[key]
    weights = definition["pre_weights"] + definition["layer_templates"]["weights"] + definition["post_weights"]
    if any(set(w) - _WEIGHT_KEYS for w in weights):
        raise UnsupportedArchitecture("a weight with options the engine does not follow (e.g. force_dtype)")

    def planned(weight: dict, layer: int | None, t: float) -> PlannedWeight:
        aliases = tuple(_substitute(a, num_layers, layer) for a in weight.get("aliases") or ())
        return PlannedWeight(_substitute(weight["name"], num_layers, layer), bool(weight.get("optional")), aliases, t)

    result = [planned(w, None, 0.0) for w in definition["pre_weights"]]
    for layer in range(num_layers):
        t = layer / (num_layers - 1) if num_layers > 1 else 1.0
        result += [planned(w, layer, t) for w in definition["layer_templates"]["weights"]]
    result += [planned(w, None, 0.0) for w in definition["post_weights"]]
    return result
