"""The part of a mergekit merge configuration the engine runs, and mergekit's parameter resolution for it:
per-model settings before global ones, ``filter`` conditions (first match on a substring of the tensor
name), and gradients (lists interpolated at the layer's ``t``)."""

from dataclasses import dataclass
from typing import Any

from merger.engine.methods import METHODS, Method

TOP_LEVEL_KEYS = frozenset({"merge_method", "models", "base_model", "dtype", "out_dtype", "parameters"})
DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
               "torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


class Unsupported(ValueError):
    """The configuration uses something the engine does not reproduce exactly; mergekit runs it."""


@dataclass(frozen=True)
class EngineConfig:
    method: Method
    models: tuple[str, ...]  # in mergekit's input order: the listed models, then the base if not listed
    base: str | None
    model_parameters: dict[str, dict[str, Any]]
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None

    def shared(self, tensor: str, t: float) -> dict[str, Any]:
        return {spec.name: self._resolve(spec, (self.parameters,), tensor, t) for spec in self.method.shared}

    def per_model(self, model: str, tensor: str, t: float) -> dict[str, Any]:
        specs = self.method.per_input if model == self.base else self.method.per_input + self.method.per_non_base
        scopes = (self.model_parameters.get(model), self.parameters)
        return {spec.name: self._resolve(spec, scopes, tensor, t) for spec in specs}

    @staticmethod
    def _resolve(spec, scopes, tensor: str, t: float) -> Any:
        for scope in scopes:
            if scope and spec.name in scope and (value := _evaluate(scope[spec.name], tensor, t, spec.kind)) is not None:
                return value
        if spec.default is None:
            raise Unsupported(f"parameter {spec.name} is required for {tensor}")
        return spec.default


def _scalar(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise Unsupported(f"parameter value {value!r} (mergekit's own validation decides)")


def _evaluate(setting: Any, tensor: str, t: float, kind: type) -> Any:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return _scalar(setting, kind)
    if not setting:
        return None
    if all(not isinstance(item, dict) for item in setting):
        values = [_scalar(item, kind) for item in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return float((1 - fraction) * values[low] + fraction * values[high])
    for condition in setting:
        if not isinstance(condition, dict) or set(condition) - {"filter", "value"} or "value" not in condition:
            raise Unsupported("a parameter list mixing conditions and values")
        where = condition.get("filter")
        if where is None or where == "*" or (tensor and where in tensor):
            return _evaluate(condition["value"], tensor, t, kind)
    return None


def _check(setting: Any, kind: type) -> None:
    """Every value a setting can evaluate to is a scalar the engine reads as mergekit does."""
    for item in setting if isinstance(setting, list) else [setting]:
        if isinstance(item, dict):
            if set(item) - {"filter", "value"} or "value" not in item or not isinstance(item.get("filter"), (str, type(None))):
                raise Unsupported(f"parameter condition {item!r}")
            _check(item["value"], kind)
        else:
            _scalar(item, kind)


def _model_name(value: Any) -> str:
    if not isinstance(value, str) or "+" in value or "@" in value:
        raise Unsupported(f"model reference {value!r} (LoRA, revision or structured reference)")
    return value


def parse(config: dict) -> EngineConfig:
    """The engine's view of a mergekit config, or Unsupported with the reason."""
    if extra := set(config) - TOP_LEVEL_KEYS:
        raise Unsupported(f"option(s) {', '.join(sorted(extra))}")
    method = METHODS.get(config.get("merge_method"))
    if method is None:
        raise Unsupported(f"merge_method {config.get('merge_method')!r}")
    if not config.get("models"):
        raise Unsupported("no models list (slices or modules)")
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and config[key] not in DTYPE_NAMES:
            raise Unsupported(f"{key} {config[key]!r}")
    base = _model_name(config["base_model"]) if config.get("base_model") is not None else None
    models, model_parameters = [], {}
    for entry in config["models"]:
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            raise Unsupported("a models entry with options other than model and parameters")
        name = _model_name(entry.get("model"))
        if name in models:
            raise Unsupported(f"model {name} listed twice")
        models.append(name)
        model_parameters[name] = entry.get("parameters") or {}
    if base is not None and base not in models:
        models.append(base)
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(p, dict) for p in model_parameters.values()):
        raise Unsupported("parameters that are not a mapping")
    specs = {spec.name: spec.kind for spec in method.shared + method.per_input + method.per_non_base}
    for scope in (parameters, *model_parameters.values()):
        for name, setting in scope.items():
            if name in specs:
                _check(setting, specs[name])
    method.check_inputs(len(models), base is not None)
    return EngineConfig(method, tuple(models), base, model_parameters, parameters,
                        DTYPE_NAMES.get(config.get("dtype")), DTYPE_NAMES.get(config.get("out_dtype")))
