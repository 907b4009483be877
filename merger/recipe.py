"""The recipe schema, in one place.

A recipe is either a plain mergekit merge config (one ``merge`` stage named after the file) or a
``stages:`` list, each stage with a ``name`` and exactly one kind key. Stage kinds form the closed table
``STAGE_KINDS``; a new kind is a new class here plus a runner in ``merger.stages``.

``parse_recipe`` reports every problem at once, each with its field path, as a ``RecipeError``.
"""

import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from merger.errors import UNENCODABLE, Problem, RecipeError, format_loc
from merger.gguf_tools import GGUF_TYPES
from merger.merge_config import MergeConfiguration, ModelReference
from merger.merge_methods import MERGEKIT_METHODS, BasePolicy, MergeMethodSpec, ParameterScope, ParameterSpec, method_spec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
RANDOMIZED_METHODS = frozenset({"dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})
MAX_SEED = 2**32 - 1  # numpy's seed range; mergekit seeds random, numpy and torch with it
# Parameters that scale tensors (weight, lambda, scale) stay within this magnitude: together with a normalization
# (at most 1 / float32's epsilon, 2**23) no valid recipe scales an input by more than about 1e13, far from the
# bf16 / fp32 limit (3.4e38). float16 (limit 65504) has no such margin; see docs/recipes.md.
SCALE_BOUND = 1000.0
SEED_DESCRIPTION = f"Random seed, 0 to {MAX_SEED}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Stage(_Strict):
    produces_model: ClassVar[bool] = True  # stores a model (or adapter) under the stage's name

    @classmethod
    def check_kind_body(cls, raw: Any, loc: tuple) -> list[Problem]:
        """Checks beyond the pydantic model's own (which is strict already): none by default."""
        return []

    def lineage_form(self) -> dict[str, Any]:
        """The stage as its cache key, card and lineage recipe know it: what makes the files."""
        return self.model_dump(mode="json")


class Provenance(_Strict):
    search: dict[str, Any] = Field(description="The record of the search that found this merge, as `merger search` writes it")


class MergeStage(_Stage):
    """A mergekit merge; ``merge`` is any mergekit config (models, slices or modules)."""

    kind: ClassVar[str] = "merge"
    name: str = Field(pattern=NAME_PATTERN, description="Stage name; later stages and the store refer to it")
    merge: dict[str, Any] = Field(description="A mergekit merge configuration, unchanged")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION + ", for randomized methods (dare_*, della, breadcrumbs)")
    provenance: Provenance | None = Field(default=None, description="Where this merge came from, as the recipe states it (a found "
                                          "recipe's search record); recorded as the model's origin, not part of its files or cache key")
    _config: Any = PrivateAttr(default=None)  # the MergeConfiguration (merger's restatement of mergekit's)

    def lineage_form(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"provenance"})

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
    weight: float = Field(default=1.0, ge=-SCALE_BOUND, le=SCALE_BOUND, description="Scales the adapter's update")


class Combination(_Strict):
    type: Literal[COMBINATIONS] = Field(default="cat", description="PEFT add_weighted_adapter combination type")  # type: ignore[valid-type]
    density: float | None = Field(default=None, ge=1e-6, le=1, description="Fraction kept (ties, dare_*, magnitude_prune); DARE divides by it")
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
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION + ", for dare_* combinations")



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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Weights dtype under transformers; auto: as stored (config.json's dtype) where the device multiplies that dtype faster than float32 (a GPU with native support; a CPU, timed once per process), else float32")
    runtime: Literal["auto", "transformers", "llama.cpp"] = Field(default="auto", description="For GGUF models: llama.cpp where installed (auto), or transformers (dequantized)")
    window: int = Field(default=512, ge=2, le=131072, description="Perplexity window in tokens (clipped to the model's context)")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Sequences per forward pass: perplexity windows, task examples decoded together (left-padded), lm-eval requests")

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
    steps: int = Field(default=40, gt=0, le=100000, description="learned: gradient steps at most")
    trials: int = Field(default=40, gt=0, le=100000, description="blackbox: finished trials at most, counting those of earlier runs of the same study")
    minutes: float = Field(default=10.0, gt=0, description="Wall-clock minutes at most for this run of the search (loading and the final checks excluded)")


class LearnedSearch(_Strict):
    examples_per_step: int = Field(default=16, gt=0, le=4096, description="Training examples per step, spread evenly over the tasks")
    learning_rate: float = Field(default=0.05, gt=0, le=10, description="Adam's learning rate for the coefficients")
    check_every: int = Field(default=5, gt=0, description="Score the candidate on the choosing lines every this many steps")
    choose_fraction: float = Field(default=0.25, ge=0, lt=1, description="Share of each task's search lines held out of training to choose the best step")
    general_weight: float = Field(default=0.0, ge=0, le=100, description="Weight of a next-token loss on general_text (one chunk per step) in the training loss; 0: off")
    general_tokens: int = Field(default=128, ge=8, le=4096, description="Tokens per chunk of general_text for that loss")


VARIED = ("weight", "density", "t", "lambda")  # the merge parameters a black-box search can vary
MODULE_FAMILIES = ("attention", "mlp")


class Granularity(_Strict):
    layer_groups: int = Field(default=1, ge=1, le=1024, description="Consecutive groups of layers, each with its own values")
    modules: list[Literal[MODULE_FAMILIES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Module families with their own values in each layer group; other tensors share one")


class BlackboxSearch(_Strict):
    sampler: Literal["tpe", "nsga2"] = Field(
        default="tpe", description="tpe: one objective (the worst task), with pruning; nsga2: one objective per task, a Pareto front")
    first_examples: int = Field(default=8, gt=0, le=100000, description="Examples per task a trial is scored on first (tpe)")
    promote: float = Field(default=0.5, gt=0, le=1, description="A trial is scored on all the search's lines when its first score is in this top fraction of the trials so far (tpe)")


class SearchSpec(_Strict):
    base: str | None = Field(default=None, description="learned: the model the adapters were trained on (a model reference)")
    adapters: list[AdapterInput] = Field(default_factory=list, description="learned: LoRA adapters; each weight is the starting coefficient of all its modules")
    merge: dict[str, Any] | None = Field(default=None, description="blackbox: the starting merge, a mergekit config (linear, task_arithmetic, ties, dare_ties or slerp) with plain-number parameters; its values are the first trial")
    vary: dict[Literal[VARIED], tuple[float, float]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="blackbox: the parameters searched, each with its [low, high] bounds (weight, density per model; t, lambda)")
    granularity: Granularity = Field(default_factory=Granularity, description="blackbox: how many values each varied parameter has")
    tasks: list[str] = Field(min_length=1, description='Task JSONL files under the model roots, {"prompt", "answer"} lines; the skills to keep')
    test_lines: str = Field(default="1-50", description="Lines of every task file never scored during the search (from 1, e.g. 1-50 or 1-10,20); scored once, on the result and the parents")
    searcher: Literal["learned", "blackbox"] = Field(
        default="learned", description="learned: one coefficient per (adapter, LoRA module), by gradient; blackbox: Optuna over a merge's parameters")
    learned: LearnedSearch = Field(default_factory=LearnedSearch)
    blackbox: BlackboxSearch = Field(default_factory=BlackboxSearch)
    budget: SearchBudget = Field(default_factory=SearchBudget)
    out_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(default=None, description="learned: the result's dtype; default: the base's (blackbox: the merge's out_dtype)")
    allow_other_base: bool = Field(default=False, description="learned: accept adapters whose adapter_config names another base model")
    general_text: str | None = Field(default=None, description="A UTF-8 text file under the model roots: the test-line table gains its perplexity (first 8 windows of 512 tokens, never trained on)")

    @model_validator(mode="after")
    def _test_lines_parse(self):
        from merger.search.split import parse_lines

        parse_lines(self.test_lines)  # raises ValueError with the reason
        if self.learned.general_weight > 0 and self.general_text is None:
            raise ValueError("learned.general_weight > 0 needs general_text")
        return self

    @model_validator(mode="after")
    def _fields_of_the_searcher(self):
        if self.searcher == "learned":
            if not self.base or not self.adapters:
                raise ValueError("the learned searcher needs base and adapters")
            if self.merge is not None or self.vary:
                raise ValueError("merge and vary are the blackbox searcher's (searcher: blackbox)")
        else:
            if self.merge is None or not self.vary:
                raise ValueError("the blackbox searcher needs merge (the starting merge) and vary (what to search)")
            if self.base is not None or self.adapters:
                raise ValueError("base and adapters are the learned searcher's; name the models in merge")
        for name, (low, high) in self.vary.items():
            if not low <= high:
                raise ValueError(f"vary.{name}: the low bound {low} is above the high bound {high}")
        return self


class SearchStage(_Stage):
    """Search merge parameters that keep every task's skill; the result is the merge recipe it writes, run."""

    kind: ClassVar[str] = "search"
    name: str = Field(pattern=NAME_PATTERN)
    search: SearchSpec
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seeds the data split, the order of training examples, the sampler and DARE")

    @classmethod
    def check_kind_body(cls, raw: Any, loc: tuple) -> list[Problem]:
        merge = raw.get("merge") if isinstance(raw, dict) else None
        return check_merge_config(merge, loc + ("merge",)) if isinstance(merge, dict) else []



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
    unknown = sorted(set(data) - {"stages"}, key=str)
    draft.problems += [Problem(str(key), "unknown field (a recipe has `stages:`, or is a plain mergekit config)") for key in unknown]
    draft.problems += [p for key in unknown for p in unencodable_text(data[key], (str(key),))]
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
        text_problems = unencodable_text(raw, loc)
        draft.problems += stage_problems + text_problems
        if stage is not None and not text_problems:  # such text never reaches a file system or a database
            draft.stages.append((i, stage))
    return draft


def unencodable_text(value: Any, loc: tuple) -> list[Problem]:
    """A problem for each key or string, at any depth, that holds a NUL character or a lone surrogate."""
    problems, pending = [], [(value, loc)]
    while pending:  # a loop, not recursion: nesting depth is the input's choice
        item, where = pending.pop()
        if isinstance(item, str) and UNENCODABLE.search(item):
            problems.append(Problem(format_loc(where), f"{_unencodable_kind(item)} in {item!r}"))
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str) and UNENCODABLE.search(key):
                    problems.append(Problem(format_loc(where + (key,)), f"{_unencodable_kind(key)} in this key"))
                pending.append((sub, where + (key,)))
        elif isinstance(item, list):
            pending.extend((sub, where + (i,)) for i, sub in enumerate(item))
    return sorted(problems, key=lambda p: p.loc)


def _unencodable_kind(text: str) -> str:
    found = {"a NUL character" if c == "\x00" else "a lone surrogate (not valid Unicode)" for c in UNENCODABLE.findall(text)}
    return " and ".join(sorted(found))


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
    """Every problem in a mergekit config: unknown keys, type errors, unknown method, parameters and their values,
    dtypes, the method's inputs and required parameters, tokenizer settings."""
    if not isinstance(raw, dict):
        return []  # the stage schema reports it
    problems = _unknown_keys(MergeConfiguration, raw, loc) + _dtype_problems(raw, loc) + _tokenizer_problems(raw, loc)
    method_name = raw.get("merge_method")
    method = None
    if isinstance(method_name, str):
        if method_name in MERGEKIT_METHODS:
            method = method_spec(method_name)
        else:
            known = ", ".join(sorted(MERGEKIT_METHODS))
            problems.append(Problem(format_loc(loc + ("merge_method",)), f"unknown merge method {method_name!r}; known: {known}"))
    if method is not None:
        problems += _parameter_value_problems(method, raw, loc)
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as exc:
        config = None
        problems += [Problem(format_loc(loc + tuple(e["loc"])), e["msg"]) for e in exc.errors()]
    except (RuntimeError, ValueError, TypeError) as exc:  # mergekit's own validators raise these directly
        config = None
        problems.append(Problem(format_loc(loc), str(exc)))
    if method is not None and config is not None:
        for group in _groups(config, raw, loc):
            problems += _group_problems(method, group, loc)
    return _dedupe(problems)


# --- mergekit values: dtypes, parameters, tokenizer -----------------------------------------------------

DTYPES = {  # the floating-point dtypes mergekit merges in (dtype) and writes (out_dtype)
    "dtype": ("bfloat16", "float32", "float64"),  # float16 makes mergekit's small constants (1e-6 ... 1e-8) 0, and 0/0 NaN
    "out_dtype": ("bfloat16", "float16", "float32", "float64"),
}


def _dtype_problems(raw: dict, loc: tuple) -> list[Problem]:
    problems = []
    for key, allowed in DTYPES.items():
        value = raw.get(key)
        if value == "float16" and key == "dtype":
            problems.append(Problem(format_loc(loc + (key,)), "merging in float16 makes NaN where mergekit divides by its small constants: "
                                    "merge in float32 or bfloat16 and write float16 with out_dtype: float16"))
        elif value is not None and value not in allowed:
            problems.append(Problem(format_loc(loc + (key,)), f"unknown dtype {value!r}; allowed: {', '.join(allowed)}"))
    return problems


MAX_PAD_TO_MULTIPLE = 1024


def _tokenizer_problems(raw: dict, loc: tuple) -> list[Problem]:
    """Tokenizer sources are models (no LoRA), ``union`` or ``base``; padding and token ids in range."""
    problems = []
    tokenizer = raw.get("tokenizer") if isinstance(raw.get("tokenizer"), dict) else {}
    for source, where in ((raw.get("tokenizer_source"), ("tokenizer_source",)), (tokenizer.get("source"), ("tokenizer", "source"))):
        if isinstance(source, str) and "+" in source:
            problems.append(Problem(format_loc(loc + where), "a tokenizer source is `union`, `base` or a model, not model+lora (an adapter has no tokenizer of its own)"))
    pad = tokenizer.get("pad_to_multiple_of")
    if isinstance(pad, int) and not isinstance(pad, bool) and not 1 <= pad <= MAX_PAD_TO_MULTIPLE:
        problems.append(Problem(format_loc(loc + ("tokenizer", "pad_to_multiple_of")), f"must be from 1 to {MAX_PAD_TO_MULTIPLE}: the vocabulary is padded to a multiple of it"))
    tokens = tokenizer.get("tokens")
    for token, embedding in tokens.items() if isinstance(tokens, dict) else ():
        where = loc + ("tokenizer", "tokens", token)
        if isinstance(token, str) and not token.strip():
            problems.append(Problem(format_loc(where), "a token is non-blank text"))
        source = embedding.get("source") if isinstance(embedding, dict) else None
        token_id = source.get("token_id") if isinstance(source, dict) else None
        if isinstance(token_id, int) and token_id < 0:
            problems.append(Problem(format_loc(where + ("source", "token_id")), "a token id is 0 or more"))
    return problems


@dataclass(frozen=True)
class ParameterRule:
    """What one value of a mergekit parameter may be; ``low``/``high`` bound numbers (``low_open``: ``low`` excluded)."""

    kind: Literal["number", "integer", "boolean"]
    meaning: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    @property
    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    @property
    def noun(self) -> str:
        return f"{'an' if self.kind == 'integer' else 'a'} {self.kind}"

    def problem(self, spec: ParameterSpec, value: Any) -> tuple[Any, str | None]:
        """(the value as mergekit reads it, why it is refused or None)."""
        if self.kind != "boolean" and isinstance(value, bool):
            return None, f"must be {self.noun}, not {str(value).lower()}"
        try:
            checked = spec.validate(value)
        except (ValidationError, ValueError, TypeError, OverflowError):
            return None, f"{value!r} is not {self.noun}"
        if self.kind == "boolean":
            return checked, None
        if checked is None:
            return None, f"must be {self.noun}"
        if not math.isfinite(checked):
            return None, f"{value!r} is not a finite number; {spec.name} ({self.meaning}) is in {self.interval}"
        if checked < self.low or checked > self.high or (self.low_open and checked == self.low):
            return None, f"{value!r} is out of range: {spec.name} ({self.meaning}) is in {self.interval}"
        return checked, None


def _scale(meaning: str) -> ParameterRule:
    return ParameterRule("number", meaning, -SCALE_BOUND, SCALE_BOUND)


def _switch(meaning: str) -> ParameterRule:
    return ParameterRule("boolean", meaning)


# Keyed by mergekit's parameter names (every parameter of every registered method has one; a test checks it).
PARAMETER_RULES: dict[str, ParameterRule] = {
    "weight": _scale("the input's weight"),
    "lambda": _scale("scales the merged task vector"),
    "scale": _scale("scales the tensor"),
    "density": ParameterRule("number", "the fraction of each task vector kept", 0, 1, low_open=True),
    "t": ParameterRule("number", "interpolates from the base (0) to the other model (1)", 0, 1),
    "gamma": ParameterRule("number", "the fraction of largest-magnitude differences removed", 0, 1),
    "epsilon": ParameterRule("number", "half the spread of keep probabilities around density", 0, 0.5),
    "select_topk": ParameterRule("number", "the fraction of highest-variance elements kept", 0, 1, low_open=True),
    "r": ParameterRule("number", "how much shared elements are rescaled", 0, SCALE_BOUND),
    "alpha": ParameterRule("number", "the largest overlap ratio counted", 0, SCALE_BOUND),
    "tol": ParameterRule("number", "the convergence tolerance", 0, 1),
    "eps": ParameterRule("number", "a small constant that avoids dividing by zero", 0, 1, low_open=True),
    "max_iter": ParameterRule("integer", "iterations at most", 1, 1000),
    "normalize": _switch("divide by the sum of the weights"),
    "normalize_weights": _switch("divide the weights by their sum"),
    "rescale": _switch("rescale sparsified task vectors to their norm"),
    "int8_mask": _switch("store masks as int8"),
    "filter_wise": _switch("per row instead of per tensor"),
    "nuslerp_row_wise": _switch("interpolate rows instead of columns"),
    "nuslerp_flatten": _switch("interpolate the flattened tensor"),
}
METHOD_PARAMETER_RULES: dict[tuple[str, str], ParameterRule] = {  # where a method gives a name another meaning
    ("nearswap", "t"): ParameterRule("number", "the similarity threshold: elements closer than t take the other model's value", 0, SCALE_BOUND),
    ("ram", "epsilon"): ParameterRule("number", "differences at most this large count as zero", 0, SCALE_BOUND),
    ("ramplus_tl", "epsilon"): ParameterRule("number", "differences at most this large count as zero", 0, SCALE_BOUND),
}
# Methods that divide by the sum of the weights, and the boolean parameter that turns it on (None: always)
WEIGHTED_MEANS: dict[str, str | None] = {"linear": "normalize", "multislerp": None}


def parameter_rule(method: str, name: str) -> ParameterRule:
    return METHOD_PARAMETER_RULES.get((method, name)) or PARAMETER_RULES[name]


def _parameter_value_problems(method: MergeMethodSpec, raw: dict, loc: tuple) -> list[Problem]:
    """Unknown parameters, parameters set where mergekit ignores them, and every value's type and range."""
    specs = {p.name: p for p in method.parameters}
    problems = []
    for param_loc, params, per_input in _parameter_blocks(raw, loc):
        for key, setting in params.items():
            where = param_loc + (key,)
            spec = specs.get(key)
            if spec is None:
                allowed = ", ".join(sorted(specs)) or "none"
                problems.append(Problem(format_loc(where), f"unknown parameter for {method.name} (allowed: {allowed})"))
                continue
            if per_input and spec.scope == ParameterScope.SHARED:
                problems.append(Problem(format_loc(where), f"{key} is one value for all inputs: set it in `parameters` (top level, slice or module); mergekit ignores it here"))
            for value_loc, message in _setting_problems(spec, parameter_rule(method.name, key), setting, where):
                problems.append(Problem(format_loc(value_loc), message))
    return problems


def _setting_problems(spec: ParameterSpec, rule: ParameterRule, setting: Any, loc: tuple) -> Iterator[tuple[tuple, str]]:
    """A setting is a value, a gradient (a list of values), or one or a list of ``{filter, value}`` conditionals."""
    conditionals = _conditionals(setting)
    if conditionals is None:
        yield from _values_problems(spec, rule, setting, loc)
        return
    for i, conditional in conditionals:
        where = loc if i is None else loc + (i,)
        for key in conditional.keys() - {"filter", "value"}:
            yield where + (key,), "unknown field (a conditional value has `filter` and `value`)"
        if "value" not in conditional:
            yield where + ("value",), "a conditional needs a value"
        elif _conditionals(conditional["value"]) is not None:
            yield where + ("value",), "a conditional's value is a value or a gradient, not another conditional"
        else:
            yield from _values_problems(spec, rule, conditional["value"], where + ("value",))


def _conditionals(setting: Any) -> list[tuple[int | None, dict]] | None:
    """The ``{filter, value}`` entries of a setting with their index, or None if it is a value or a gradient."""
    if isinstance(setting, dict):
        return [(None, setting)]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        return list(enumerate(setting))
    return None


def _values_problems(spec: ParameterSpec, rule: ParameterRule, value: Any, loc: tuple) -> Iterator[tuple[tuple, str]]:
    if not isinstance(value, list):
        yield from _scalar_problems(spec, rule, value, loc)
        return
    if not value:
        yield loc, "an empty gradient: give a value or a list of values"
    elif rule.kind == "integer" and len(value) > 1:
        yield loc, f"{spec.name} takes one integer, not a gradient (values between its points would not be integers)"
    for i, item in enumerate(value):
        yield from _scalar_problems(spec, rule, item, loc + (i,))


def _scalar_problems(spec: ParameterSpec, rule: ParameterRule, value: Any, loc: tuple) -> Iterator[tuple[tuple, str]]:
    if not isinstance(value, (bool, int, float, str)):
        yield loc, f"must be {rule.noun}" + (" (a gradient is a flat list of values)" if isinstance(value, (list, dict)) else "")
        return
    _, message = rule.problem(spec, value)
    if message:
        yield loc, message


# --- mergekit inputs: each group of tensors merged alike, its inputs and the parameters they get ---------


@dataclass
class _Input:
    reference: ModelReference
    loc: tuple  # where its own parameters are (or would be)
    scopes: list[Any]  # the parameter blocks it reads, highest precedence first: its own, slice, module, top level


@dataclass
class _Group:
    loc: tuple
    base: ModelReference | None
    inputs: list[_Input]
    shared: list[Any]  # the parameter blocks of one-value-for-all parameters: slice, module, top level


def _groups(config: MergeConfiguration, raw: dict, loc: tuple) -> Iterator[_Group]:
    """The groups mergekit merges (a models list, each slice), as it forms them: a base not among the models joins them."""
    outer = [raw.get("parameters")]
    if config.models:
        yield _models_group(config.models, raw["models"], loc + ("models",), config.base_model, loc + ("base_model",), outer)
    for i, (out_slice, raw_slice) in enumerate(zip(config.slices or [], raw.get("slices") or [])):
        yield _slice_group(out_slice, raw_slice, loc + ("slices", i), config.base_model, outer)
    for name, module in (config.modules or {}).items():
        raw_module = raw["modules"][name]
        module_outer = [raw_module.get("parameters"), *outer]
        where = loc + ("modules", name)
        if module.models:
            yield _models_group(module.models, raw_module["models"], where + ("models",), config.base_model, loc + ("base_model",), module_outer)
        for i, (out_slice, raw_slice) in enumerate(zip(module.slices or [], raw_module.get("slices") or [])):
            yield _slice_group(out_slice, raw_slice, where + ("slices", i), config.base_model, module_outer)


def _models_group(models, raw_models: list, loc: tuple, base: ModelReference | None, base_loc: tuple, outer: list) -> _Group:
    inputs = [_Input(m.model, loc + (i, "parameters"), [raw_models[i].get("parameters"), *outer]) for i, m in enumerate(models)]
    if base is not None and all(m.model != base for m in models):
        inputs.append(_Input(base, base_loc, outer))
    return _Group(loc, base, inputs, outer)


def _slice_group(out_slice, raw_slice: dict, loc: tuple, base: ModelReference | None, outer: list) -> _Group:
    shared = [raw_slice.get("parameters"), *outer]
    inputs = [_Input(src.model, loc + ("sources", j, "parameters"), [raw_src.get("parameters"), *shared])
              for j, (src, raw_src) in enumerate(zip(out_slice.sources, raw_slice["sources"]))]
    return _Group(loc + ("sources",), out_slice.base_model or base, inputs, shared)


def _group_problems(method: MergeMethodSpec, group: _Group, config_loc: tuple) -> list[Problem]:
    """The method's input contract, its required parameters, and the weights and densities it can divide by."""
    name = method.name
    problems = []
    if group.base is None and method.contract.base == BasePolicy.REQUIRED:
        problems.append(Problem(format_loc(config_loc + ("base_model",)), f"{name} needs a base_model"))
    else:
        try:
            method.contract.validate_ids([inp.reference for inp in group.inputs], group.base)
        except ValueError as exc:
            problems.append(Problem(format_loc(group.loc), f"{name}: {exc}"))
    values: dict[tuple[str, int | None], list[list] | None] = {}  # (parameter, input index or None) -> alternatives
    for spec in method.parameters:
        if spec.scope == ParameterScope.SHARED:
            alternatives, covered = _candidates(spec, name, group.shared)
            values[spec.name, None] = alternatives
            if not covered:
                problems.append(Problem(format_loc(config_loc + ("parameters", spec.name)), f"{name} needs {spec.name} ({parameter_rule(name, spec.name).meaning})"))
            continue
        for i, inp in enumerate(group.inputs):
            if spec.scope == ParameterScope.NON_BASE and inp.reference == group.base:
                continue
            alternatives, covered = _candidates(spec, name, inp.scopes)
            values[spec.name, i] = alternatives
            if not covered:
                who = "every input" + (" but the base" if spec.scope == ParameterScope.NON_BASE else "")
                problems.append(Problem(format_loc(inp.loc + (spec.name,)), f"{name} needs a {spec.name} for {who}: here or in `parameters`"))
    return problems + _weighted_mean_problems(name, group, values) + _della_problems(name, group, values)


def _candidates(spec: ParameterSpec, method: str, scopes: list[Any]) -> tuple[list[list] | None, bool]:
    """(every value list the parameter can take for some tensor, whether every tensor gets one).

    Each alternative is a gradient's points (one point for a plain value). Scopes are read in precedence order,
    as mergekit does; a scope whose conditionals may not match lets the next one apply. None: a value is invalid
    (reported where it is), so nothing more is checked.
    """
    alternatives = []
    rule = parameter_rule(method, spec.name)
    for params in scopes:
        if not isinstance(params, dict) or spec.name not in params:
            continue
        setting = params[spec.name]
        conditionals = _conditionals(setting)
        entries = [setting] if conditionals is None else [c.get("value") for _, c in conditionals]
        for entry in entries:
            points = [rule.problem(spec, v) for v in (entry if isinstance(entry, list) else [entry])]
            if not points or any(message for _, message in points) or rule.kind == "integer" and len(points) > 1:
                return None, True
            alternatives.append([value for value, _ in points])
        if conditionals is None or any(c.get("filter") in (None, "*") for _, c in conditionals):
            return alternatives, True
    if spec.required:
        return alternatives, False
    return alternatives + [[spec.validate(spec.default)]], True


def _weighted_mean_problems(method: str, group: _Group, values: dict) -> list[Problem]:
    """A weighted mean divides by the sum of the weights: they must be >= 0 and never all 0 for one tensor."""
    if method not in WEIGHTED_MEANS:
        return []
    switch = WEIGHTED_MEANS[method]
    if switch is not None and not any(any(alt) for alt in values.get((switch, None)) or []):
        return []
    weights = {i: alts for (param, i), alts in values.items() if param == "weight"}
    if any(alts is None for alts in weights.values()) or not weights:
        return []
    mean = f"{method} with {switch}: true" if switch else method
    problems = [
        Problem(format_loc(group.inputs[i].loc + ("weight",)), f"{mean} takes a weighted mean: weights are 0 or more" + (f" (set {switch}: false for signed weights)" if switch else ""))
        for i, alts in weights.items() if any(v < 0 for alt in alts for v in alt)
    ]
    if problems:
        return problems
    common = [(0.0, 1.0)]
    for alts in weights.values():
        common = _intersect(common, [span for alt in alts for span in _zeros(alt)])
    if common:
        return [Problem(format_loc(group.loc), f"{mean} divides by the sum of the weights, which can be 0 (every weight is 0 at gradient position {common[0][0]:g})")]
    return []


FLOAT32_TINY = 2.0**-126  # float32's smallest normal number: a smaller weight may be 0 once mergekit casts it


def _zeros(points: list[float]) -> list[tuple[float, float]]:
    """Where in [0, 1] a gradient of non-negative points (evenly spaced, interpolated linearly) is 0 in float32."""
    zero = [v < FLOAT32_TINY for v in points]
    if len(points) == 1:
        return [(0.0, 1.0)] if zero[0] else []
    step = 1 / (len(points) - 1)
    spans = [(i * step, (i + 1) * step) for i, (a, b) in enumerate(zip(zero, zero[1:])) if a and b]
    return spans + [(i * step, i * step) for i, z in enumerate(zero) if z]


def _intersect(spans: list[tuple[float, float]], others: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(max(a, c), min(b, d)) for a, b in spans for c, d in others if max(a, c) <= min(b, d)]


def _della_problems(method: str, group: _Group, values: dict) -> list[Problem]:
    """Methods with both density and epsilon keep elements with probability density ± epsilon, inside (0, 1)."""
    problems = []
    for i, inp in enumerate(group.inputs):
        densities, epsilons = values.get(("density", i)), values.get(("epsilon", i))
        if not densities or not epsilons:
            continue
        epsilon = max(max(alt) for alt in epsilons)
        for alt in densities:
            low, high = min(alt), max(alt)
            if low >= 1:
                continue  # density 1 keeps everything, whatever epsilon
            if low <= epsilon or (epsilon > 0 and high + epsilon >= 1):
                problems.append(Problem(format_loc(inp.loc + ("density",)), f"{method} keeps elements with probability density ± epsilon, inside (0, 1): with epsilon {epsilon:g}, a density below 1 is in ({epsilon:g}, {1 - epsilon:g})"))
                break
    return problems


def _parameter_blocks(raw: dict, loc: tuple, per_input: bool = False):
    """(location, mapping, whether it is an input's own) of every ``parameters`` block in a mergekit config."""
    if isinstance(raw.get("parameters"), dict):
        yield loc + ("parameters",), raw["parameters"], per_input
    for key in ("models", "slices", "sources"):
        items = raw.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                yield from _parameter_blocks(item, loc + (key, i), per_input=key != "slices")
    modules = raw.get("modules")
    for name, module in (modules.items() if isinstance(modules, dict) else ()):
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
    from mergekit.config import MergeConfiguration

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
    for key, allowed in DTYPES.items():
        mergekit["properties"][key] = {**mergekit["properties"][key], "anyOf": [{"enum": list(allowed)}, {"type": "null"}]}
    defs["MergeConfiguration"] = {**mergekit, "additionalProperties": False}
    defs["MergeStage"]["properties"]["merge"] = {"$ref": "#/$defs/MergeConfiguration", "description": MergeStage.model_fields["merge"].description}
    seed = {key: defs["MergeStage"]["properties"]["seed"][key] for key in ("type", "minimum", "maximum", "description")}
    plain = {**defs["MergeConfiguration"], "title": "Plain mergekit config", "properties": {**mergekit["properties"], "seed": seed}}
    staged = {key: schema.pop(key) for key in ("properties", "required", "type", "additionalProperties") if key in schema}
    schema["oneOf"] = [{"title": "Staged recipe", **staged}, plain]
    schema["title"] = "merger recipe"
    return schema
