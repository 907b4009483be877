"""The recipe schema, in one place.

A recipe is either a plain mergekit merge config (one ``merge`` stage named after the file) or a
``stages:`` list, each stage with a ``name`` and exactly one kind key. Stage kinds form the closed table
``STAGE_KINDS``; a new kind is a new class here plus a runner in ``merger.stages``.

``parse_recipe`` reports every problem at once, each with its field path, as a ``RecipeError``.
"""

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry as merge_methods
from mergekit.merge_methods.base import BasePolicy
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from merger.errors import Problem, RecipeError, format_loc
from merger.gguf_tools import GGUF_TYPES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
RANDOMIZED_METHODS = frozenset({"dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stage(_Strict):
    produces_model: ClassVar[bool] = True  # stores a model (or adapter) under the stage's name

    @classmethod
    def check_kind_body(cls, raw: Any, loc: tuple) -> list[Problem]:
        """Checks beyond the pydantic model's own (which is strict already): none by default."""
        return []


class MergeStage(_Stage):
    """A mergekit merge; ``merge`` is any mergekit config (models, slices or modules)."""

    kind: ClassVar[str] = "merge"
    name: str = Field(pattern=NAME_PATTERN, description="Stage name; later stages and the store refer to it")
    merge: dict[str, Any] = Field(description="A mergekit merge configuration, unchanged")
    seed: int = Field(default=0, description="Random seed for randomized methods (dare_*, della, breadcrumbs)")
    _config: MergeConfiguration | None = PrivateAttr(default=None)

    @property
    def config(self) -> MergeConfiguration:
        if self._config is None:
            self._config = MergeConfiguration.model_validate(self.merge)
        return self._config

    @classmethod
    def check_kind_body(cls, raw: Any, loc: tuple) -> list[Problem]:
        return check_merge_config(raw, loc)


COMBINATIONS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
EQUAL_RANK_COMBINATIONS = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
DENSITY_COMBINATIONS = frozenset(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude_prune")))


class AdapterInput(_Strict):
    path: str = Field(description="A PEFT LoRA adapter: stored id or name, directory under the model roots, org/name[@rev], or an earlier combine stage")
    weight: float = Field(default=1.0, description="Scales the adapter's update")


class Combination(_Strict):
    type: Literal[COMBINATIONS] = Field(default="cat", description="PEFT add_weighted_adapter combination type")  # type: ignore[valid-type]
    density: float | None = Field(default=None, gt=0, le=1, description="Fraction kept (ties, dare_*, magnitude_prune)")
    svd_rank: int | None = Field(default=None, gt=0, description="Rank of *_svd results; default: the largest input rank")
    majority_sign_method: Literal["total", "frequency"] = "total"

    @model_validator(mode="after")
    def _density_where_needed(self):
        if self.type in DENSITY_COMBINATIONS and self.density is None:
            raise ValueError(f"combination {self.type} needs a density")
        return self


class AdaptersSpec(_Strict):
    base: str = Field(description="The model the adapters were trained on (a model reference)")
    mode: Literal["fold", "combine"] = Field(description="fold: into the base's weights (a full model); combine: into one new adapter")
    adapters: list[AdapterInput] = Field(min_length=1)
    combination: Combination | None = Field(default=None, description="combine mode only; default: cat (exact)")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(default=None, description="fold output dtype; default: the base's")
    allow_other_base: bool = Field(default=False, description="Accept adapters whose adapter_config names another base model")

    @model_validator(mode="after")
    def _mode_fields(self):
        if self.mode == "fold" and self.combination is not None:
            raise ValueError("combination applies to mode: combine only")
        if self.mode == "combine" and self.dtype is not None:
            raise ValueError("dtype applies to mode: fold only")
        return self


class AdaptersStage(_Stage):
    """Fold LoRA adapters into a base model, or combine them into one adapter."""

    kind: ClassVar[str] = "adapters"
    name: str = Field(pattern=NAME_PATTERN)
    adapters: AdaptersSpec
    seed: int = Field(default=0, description="Random seed for dare_* combinations")



class ExtractLoraSpec(_Strict):
    model: str = Field(description="The full fine-tune (a model reference)")
    base: str = Field(description="The model it was fine-tuned from")
    rank: int = Field(gt=0, le=4096, description="Largest LoRA rank (each module's rank is at most this)")
    include_embeddings: bool = Field(
        default=False, description="Also store embeddings / lm_head (at full size: an adapter as large as the model)")


class ExtractLoraStage(_Stage):
    """A LoRA adapter that approximates a fine-tune's difference from its base (mergekit-extract-lora)."""

    kind: ClassVar[str] = "extract_lora"
    name: str = Field(pattern=NAME_PATTERN)
    extract_lora: ExtractLoraSpec



QUANTIZE_TYPES = {"gguf": GGUF_TYPES, "torchao": ("int8", "int4")}


class QuantizeSpec(_Strict):
    model: str = Field(description="The model to quantize (a model reference with safetensors weights)")
    format: Literal[tuple(QUANTIZE_TYPES)] = Field(  # type: ignore[valid-type]
        default="gguf", description="gguf: one file for llama.cpp / Ollama; torchao: a transformers directory")
    type: str = Field(description="gguf: " + ", ".join(GGUF_TYPES) + "; torchao: int8 (CPU or GPU), int4 (GPU workers only)")

    @model_validator(mode="after")
    def _type_of_format(self):
        if self.type not in QUANTIZE_TYPES[self.format]:
            raise ValueError(f"type {self.type!r} is not a {self.format} type; choose one of {', '.join(QUANTIZE_TYPES[self.format])}")
        return self


class QuantizeStage(_Stage):
    """A quantized copy of a model: GGUF (llama.cpp's converter and quantizer) or torchao (transformers)."""

    kind: ClassVar[str] = "quantize"
    name: str = Field(pattern=NAME_PATTERN)
    quantize: QuantizeSpec



class EvaluateSpec(_Strict):
    models: list[str] = Field(min_length=1, description="Models to evaluate: earlier stage names or model references")
    tasks: list[str] = Field(default_factory=list, description='Task JSONL files under the model roots: {"prompt", "answer"} lines (greedy generation) or {"prompt", "choices", "answer": index} lines (multiple choice)')
    perplexity: list[str] = Field(default_factory=list, description="UTF-8 text files under the model roots")
    lm_eval: list[str] = Field(default_factory=list, description="lm-evaluation-harness task YAMLs with local data files, under the model roots")
    limit: int | None = Field(default=None, gt=0, description="Examples per task file, windows of text, documents per lm-eval task; default: all")
    parents: bool = Field(default=True, description="Also evaluate each model's parents (base, donors) and a quantized model's unquantized source")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Weights dtype under transformers")
    runtime: Literal["auto", "transformers", "llama.cpp"] = Field(default="auto", description="For GGUF models: llama.cpp where installed (auto), or transformers (dequantized)")
    window: int = Field(default=512, ge=2, le=131072, description="Perplexity window in tokens (clipped to the model's context)")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Perplexity windows (lm-eval requests) per forward pass")

    @model_validator(mode="after")
    def _some_data(self):
        if not (self.tasks or self.perplexity or self.lm_eval):
            raise ValueError("name at least one data file: tasks, perplexity or lm_eval")
        return self


class EvaluateStage(_Stage):
    """Evaluate models (and by default their parents) on the same data; results are stored in lineage, no model is made."""

    kind: ClassVar[str] = "evaluate"
    produces_model: ClassVar[bool] = False
    name: str = Field(pattern=NAME_PATTERN)
    evaluate: EvaluateSpec



class SearchBudget(_Strict):
    steps: int = Field(default=40, gt=0, le=100000, description="Gradient steps at most")
    minutes: float = Field(default=10.0, gt=0, description="Wall-clock minutes at most for the search (loading and the final checks excluded)")


class LearnedSearch(_Strict):
    examples_per_step: int = Field(default=16, gt=0, le=4096, description="Training examples per step, spread evenly over the tasks")
    learning_rate: float = Field(default=0.05, gt=0, le=10, description="Adam's learning rate for the coefficients")
    check_every: int = Field(default=5, gt=0, description="Score the candidate on the choosing lines every this many steps")
    choose_fraction: float = Field(default=0.25, ge=0, lt=1, description="Share of each task's search lines held out of training to choose the best step")


class SearchSpec(_Strict):
    base: str = Field(description="The model the adapters were trained on (a model reference)")
    adapters: list[AdapterInput] = Field(min_length=1, description="LoRA adapters; each weight is the starting coefficient of all its modules")
    tasks: list[str] = Field(min_length=1, description='Task JSONL files under the model roots, {"prompt", "answer"} lines; the skills to keep')
    test_lines: str = Field(default="1-50", description="Lines of every task file never scored during the search (from 1, e.g. 1-50 or 1-10,20); scored once, on the result and the parents")
    searcher: Literal["learned"] = Field(default="learned", description="learned: one coefficient per (adapter, LoRA module), by gradient on the search's lines")
    learned: LearnedSearch = Field(default_factory=LearnedSearch)
    budget: SearchBudget = Field(default_factory=SearchBudget)
    out_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(default=None, description="The result's dtype; default: the base's")
    allow_other_base: bool = Field(default=False, description="Accept adapters whose adapter_config names another base model")

    @model_validator(mode="after")
    def _test_lines_parse(self):
        from merger.search.split import parse_lines

        parse_lines(self.test_lines)  # raises ValueError with the reason
        return self


class SearchStage(_Stage):
    """Search merge parameters that keep every task's skill; the result is the merge recipe it writes, run."""

    kind: ClassVar[str] = "search"
    name: str = Field(pattern=NAME_PATTERN)
    search: SearchSpec
    seed: int = Field(default=0, description="Seeds the data split and the order of training examples")



STAGE_KINDS: dict[str, type[_Stage]] = {
    "merge": MergeStage, "adapters": AdaptersStage, "extract_lora": ExtractLoraStage, "quantize": QuantizeStage,
    "evaluate": EvaluateStage,
    "search": SearchStage,
}
Stage = Union[tuple(STAGE_KINDS.values())]  # type: ignore[valid-type]


class Recipe(_Strict):
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


@dataclass
class Draft:
    """What could be parsed of a recipe: the valid stages with their index, every stage name, the problems."""

    stages: list[tuple[int, Any]] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def recipe(self) -> Recipe:
        if self.problems:
            raise RecipeError(self.problems)
        return Recipe(stages=[stage for _, stage in self.stages])


def parse_recipe(data: Any, *, default_name: str) -> Recipe:
    """Validate raw recipe data; raise ``RecipeError`` listing every problem with its field path."""
    return draft_recipe(data, default_name=default_name).recipe()


def draft_recipe(data: Any, *, default_name: str) -> Draft:
    """Parse as much of a recipe as is valid, so that later checks can run on the valid stages."""
    if isinstance(data, dict) and "stages" not in data and "merge_method" in data:
        data = _plain_mergekit_config_as_recipe(data, default_name)
    draft = Draft()
    if not isinstance(data, dict):
        draft.problems.append(Problem("", "a recipe is a mapping: a mergekit config or `stages: [...]`"))
        return draft
    unknown = sorted(set(data) - {"stages"})
    draft.problems += [Problem(key, "unknown field (a recipe has `stages:`, or is a plain mergekit config)") for key in unknown]
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        draft.problems.append(Problem("stages", "must be a non-empty list of stages"))
        return draft

    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_stages):
        loc = ("stages", i)
        name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
        draft.names.append(name)
        if name in seen:
            draft.problems.append(Problem(format_loc(loc + ("name",)), f"duplicate stage name {name!r} (also stages[{seen[name]}])"))
        elif name:
            seen[name] = i
        stage, stage_problems = _parse_stage(raw, loc)
        draft.problems += stage_problems
        if stage is not None:
            draft.stages.append((i, stage))
    return draft


def _plain_mergekit_config_as_recipe(config: dict, name: str) -> dict:
    """A plain mergekit config is a one-stage recipe; merger adds only an optional top-level ``seed``."""
    merge = {k: v for k, v in config.items() if k != "seed"}
    stage = {"name": name, "merge": merge}
    if "seed" in config:
        stage["seed"] = config["seed"]
    return {"stages": [stage]}


def _parse_stage(raw: Any, loc: tuple) -> tuple[Any, list[Problem]]:
    if not isinstance(raw, dict):
        return None, [Problem(format_loc(loc), "a stage is a mapping with `name` and one kind")]
    kinds = [k for k in STAGE_KINDS if k in raw]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none"
        return None, [Problem(format_loc(loc), f"a stage needs exactly one kind of {sorted(STAGE_KINDS)} (found: {found})")]
    kind_cls = STAGE_KINDS[kinds[0]]
    problems = kind_cls.check_kind_body(raw[kinds[0]], loc + (kinds[0],))
    try:
        stage = kind_cls.model_validate(raw)
    except ValidationError as exc:
        problems = [Problem(format_loc(loc + tuple(e["loc"])), e["msg"]) for e in exc.errors()] + problems
        return None, problems
    return stage, problems  # planned even with problems, so that its references get checked too


# --- mergekit configs: strict keys, known methods and parameters ---------------------------------------


def check_merge_config(raw: Any, loc: tuple) -> list[Problem]:
    """Every problem in a mergekit config: unknown keys, type errors, unknown method or parameters."""
    if not isinstance(raw, dict):
        return []  # the stage schema reports it
    problems = _unknown_keys(MergeConfiguration, raw, loc)
    method_name = raw.get("merge_method")
    method = None
    if isinstance(method_name, str):
        try:
            method = merge_methods.get(method_name)
        except RuntimeError:
            known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
            problems.append(Problem(format_loc(loc + ("merge_method",)), f"unknown merge method {method_name!r}; known: {known}"))
    if method is not None:
        known_params = {p.name for p in method.spec.parameters}
        for param_loc, params in _parameter_blocks(raw, loc):
            for key in params:
                if key not in known_params:
                    allowed = ", ".join(sorted(known_params)) or "none"
                    problems.append(Problem(format_loc(param_loc + (key,)), f"unknown parameter for {method_name} (allowed: {allowed})"))
        if method.spec.contract.base == BasePolicy.REQUIRED and not raw.get("base_model") and "models" in raw:
            problems.append(Problem(format_loc(loc + ("base_model",)), f"{method_name} needs a base_model"))
    try:
        MergeConfiguration.model_validate(raw)
    except ValidationError as exc:
        problems += [Problem(format_loc(loc + tuple(e["loc"])), e["msg"]) for e in exc.errors()]
    except (RuntimeError, ValueError, TypeError) as exc:  # mergekit's own validators raise these directly
        problems.append(Problem(format_loc(loc), str(exc)))
    return _dedupe(problems)


def _parameter_blocks(raw: dict, loc: tuple):
    """(location, mapping) of every ``parameters`` block in a mergekit config."""
    if isinstance(raw.get("parameters"), dict):
        yield loc + ("parameters",), raw["parameters"]
    for key in ("models", "slices"):
        for i, item in enumerate(raw.get(key) or []):
            if isinstance(item, dict):
                yield from _parameter_blocks(item, loc + (key, i))
    for i, src in enumerate(raw.get("sources") or []):
        if isinstance(src, dict):
            yield from _parameter_blocks(src, loc + ("sources", i))
    for name, module in (raw.get("modules") or {}).items():
        if isinstance(module, dict):
            yield from _parameter_blocks(module, loc + ("modules", name))


def _unknown_keys(model: type[BaseModel], raw: Any, loc: tuple) -> list[Problem]:
    """Keys of ``raw`` that ``model`` (a mergekit pydantic class, which ignores extras) does not know."""
    if not isinstance(raw, dict):
        return []
    problems = []
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            problems.append(Problem(format_loc(loc + (key,)), f"unknown field (allowed: {', '.join(fields)})"))
            continue
        if key == "parameters":
            continue  # checked against the merge method
        for sub_model, sub_value, sub_loc in _nested(fields[key].annotation, value, loc + (key,)):
            problems += _unknown_keys(sub_model, sub_value, sub_loc)
    return problems


def _nested(annotation: Any, value: Any, loc: tuple):
    """Pair the nested values of a field with the pydantic class that validates them."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union or str(origin) == "types.UnionType":
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        containers = [a for a in args if typing.get_origin(a) in (list, dict, tuple)]
        if isinstance(value, dict) and len(models) == 1:
            yield models[0], value, loc
        for container in containers:
            yield from _nested(container, value, loc)
    elif origin is list and isinstance(value, list) and args:
        for i, item in enumerate(value):
            yield from _nested(args[0], item, loc + (i,))
    elif origin is dict and isinstance(value, dict) and len(args) == 2:
        for k, item in value.items():
            yield from _nested(args[1], item, loc + (k,))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        yield annotation, value, loc


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))



def recipe_json_schema() -> dict:
    """JSON Schema of a recipe: the ``stages`` form or a plain mergekit config, as merger enforces them."""
    schema = Recipe.model_json_schema()
    mergekit = MergeConfiguration.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs.update(mergekit.pop("$defs"))
    for definition in defs.values():  # merger rejects unknown keys in mergekit configs too
        if definition.get("type") == "object" and "properties" in definition:
            definition.setdefault("additionalProperties", False)
    for reference in ("ModelReference", "ModelPath"):
        defs[reference] = {
            "anyOf": [{"type": "string", "description": "path, store id or name, stage name, or org/name[@rev]; `model+lora` adds a LoRA"}, defs[reference]]
        }
    defs["MergeConfiguration"] = {**mergekit, "additionalProperties": False}
    defs["MergeStage"]["properties"]["merge"] = {"$ref": "#/$defs/MergeConfiguration", "description": MergeStage.model_fields["merge"].description}
    seed = {"type": "integer", "description": MergeStage.model_fields["seed"].description}
    plain = {**defs["MergeConfiguration"], "title": "Plain mergekit config", "properties": {**mergekit["properties"], "seed": seed}}
    staged = {key: schema.pop(key) for key in ("properties", "required", "type", "additionalProperties") if key in schema}
    schema["oneOf"] = [{"title": "Staged recipe", **staged}, plain]
    schema["title"] = "merger recipe"
    return schema
