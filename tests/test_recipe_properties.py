"""Generated recipes either fail validation with problems, or run to the end and make only finite tensors.

Hypothesis writes mergekit configs over the tiny test models: every merge method, models or slices, parameters
at every level (top, per model, per slice and source) as values, gradients or ``{filter, value}`` conditionals,
valid values and hostile ones (NaN, inf, 1e308, words, booleans, nesting, NUL, lone surrogates), dtypes, seeds,
tokenizer sources; sometimes a second stage that merges the first, or an adapters stage (fold or any PEFT
combination, with hostile weights and densities) before it. Validation must see every reason a run would fail:
a validated recipe that then fails, or makes a NaN or inf, is a bug in the checks.
``MERGER_RECIPE_EXAMPLES`` raises the number of examples (default 40) to hunt for more.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from mergekit.merge_methods.registry import registered_methods
from safetensors.torch import load_file

from merger.errors import UNENCODABLE, RecipeError
from merger.orchestrator import check_recipe, run_recipe
from merger.recipe import COMBINATIONS, DENSITY_COMBINATIONS, MAX_SEED, SCALE_BOUND, parameter_rule
from merger.settings import Settings
from merger.store import Store
from tests.tiny_models import make_lora

METHODS = {m.spec.name: m for m in registered_methods()}
FAMILY = ["gemma3-base", "gemma3-ft1", "gemma3-ft2"]
LORAS = {"lora-r4": dict(seed=1, r=4), "lora-r8": dict(seed=2, r=8, alpha=4, targets=("q_proj", "up_proj"))}  # on gemma3-base
LAYERS = 4  # tiny_models.tiny_config
EXAMPLES = int(os.environ.get("MERGER_RECIPE_EXAMPLES", "40"))

HOSTILE = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 2**70, -1, 2, 5, "heavy", "x", "nan", "1e-3", True, None,
    [], [[0.5]], [0.1, "x"], {"value": 0.5, "filter": "mlp"}, {"filter": "mlp"}, {"value": {"value": 1}}, "a\x00b", "\ud800",
])


def sometimes(valid, hostile, one_in: int = 12):
    """Mostly ``valid``; one draw in ``one_in`` from ``hostile``."""
    return st.integers(1, one_in).flatmap(lambda i: hostile if i == one_in else valid)  # the simplest draw is valid


def valid_value(method: str, name: str):
    rule = parameter_rule(method, name)
    if rule.kind == "boolean":
        return st.booleans()
    if rule.kind == "integer":
        return st.integers(int(rule.low), min(int(rule.high), 20))
    typical = st.floats(max(rule.low, 0), min(rule.high, 2), exclude_min=rule.low_open and rule.low >= 0)
    return st.one_of(typical, st.floats(rule.low, rule.high, exclude_min=rule.low_open), st.sampled_from([rule.high, *([] if rule.low_open else [rule.low])]))


def setting(method: str, name: str):
    value = valid_value(method, name)
    if parameter_rule(method, name).kind == "integer":
        return sometimes(value, HOSTILE)
    gradient = st.lists(value, min_size=1, max_size=4)
    conditional = st.fixed_dictionaries({"filter": st.sampled_from(["mlp", "self_attn", "embed", "*"]), "value": value | gradient})
    catch_all = st.fixed_dictionaries({"value": value | gradient})
    conditionals = st.one_of(st.tuples(st.lists(conditional, min_size=1, max_size=2), st.lists(catch_all, max_size=1)).map(lambda p: p[0] + p[1]),
                             catch_all.map(lambda c: [c]))
    return sometimes(st.one_of(value, value, gradient, conditionals, conditional), HOSTILE)


def parameters(method: str, names: list[str], required: list[str]):
    """A parameters block: the ``required`` names (almost always), some of ``names``, rarely a misspelt one."""
    optional = st.lists(st.sampled_from(names), unique=True, max_size=3) if names else st.just([])
    misspelt = sometimes(st.just([]), st.just(["densty"]), one_in=20)
    dropped = sometimes(st.just(False), st.just(True), one_in=20)
    keys = st.tuples(optional, misspelt, dropped).map(lambda p: list(dict.fromkeys(([] if p[2] else required) + p[0] + p[1])))
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: setting(method, k) if k != "densty" else st.just(0.5) for k in ks}))


@st.composite
def merge_configs(draw, family):
    """A mergekit config over ``family`` (base first): mostly within the method's contract, with its parameters."""
    method = draw(st.sampled_from(sorted(METHODS)))
    spec = METHODS[method].spec
    base_policy = spec.contract.base.value
    with_base = draw(sometimes(st.just(base_policy != "ignored"), st.booleans(), one_in=8)) and method != "passthrough"
    donors = {"nuslerp": 2, "model_stock": 2, "passthrough": 1}.get(method) or (1 if spec.contract.max_inputs == 2 else draw(st.integers(1, 2)))
    donors = draw(sometimes(st.just(donors), st.integers(1, 2), one_in=10))
    models = family[1:1 + donors]
    base = family[0] if with_base else None
    inputs = ([base] if base and draw(st.booleans()) else []) + models
    shared = [p.name for p in spec.parameters if p.scope.value == "shared"]
    per_input = [p.name for p in spec.parameters if p.scope.value != "shared"]
    needed_shared = [p.name for p in spec.parameters if p.required and p.scope.value == "shared"]
    needed_per_input = [p.name for p in spec.parameters if p.required and p.scope.value != "shared"]
    global_weight = bool(needed_per_input) and draw(st.booleans())  # required per-input parameters set once at the top
    own = lambda: draw(parameters(method, per_input, [] if global_weight else needed_per_input))  # noqa: E731
    config = {"merge_method": method}
    if base:
        config["base_model"] = base
    if draw(st.booleans()) or method == "passthrough" and draw(st.booleans()):
        config["models"] = [{"model": m, "parameters": own()} for m in inputs]
    else:
        cut = draw(st.sampled_from([LAYERS, 1, 2]))
        ranges = [[0, LAYERS]] if cut == LAYERS else [[0, cut], [cut, LAYERS]]
        config["slices"] = [{"sources": [{"model": m, "layer_range": r, "parameters": own()} for m in ([base] if base else []) + models]}
                            for r in ranges]
    config["parameters"] = draw(parameters(method, shared + per_input, needed_shared + (needed_per_input if global_weight else [])))
    for key in ("dtype", "out_dtype"):
        dtype = draw(sometimes(st.sampled_from([None, "bfloat16", "float32", "float64", *(["float16"] if key == "out_dtype" else [])]),
                               st.sampled_from(["float33", "int8", "torch.float32", "float16", "a\x00b", ""]), one_in=15))
        if dtype is not None:
            config[key] = dtype
    tokenizer = draw(sometimes(st.sampled_from([None, None, "base", "union", family[1]]), st.just(f"{family[1]}+{family[-1]}"), one_in=15))
    if tokenizer is not None:
        config["tokenizer_source"] = tokenizer
    return config


@st.composite
def adapters_specs(draw):
    """Fold LoRA adapters into gemma3-base, or combine them (any PEFT combination), with merger's own fields."""
    weight = st.floats(-2, 2) | st.sampled_from([SCALE_BOUND, -SCALE_BOUND])
    paths = draw(st.lists(st.sampled_from(sorted(LORAS)), min_size=1, max_size=2, unique=True))
    spec = {"base": "gemma3-base", "mode": draw(st.sampled_from(["fold", "combine"])),
            "adapters": [{"path": path, "weight": draw(sometimes(weight, HOSTILE))} for path in paths]}
    if spec["mode"] == "fold" and draw(st.booleans()):
        spec["dtype"] = draw(sometimes(st.sampled_from(["bfloat16", "float16", "float32"]), st.sampled_from(["float33", "int8"])))
    if spec["mode"] == "combine" and draw(st.booleans()):
        kind = draw(st.sampled_from(COMBINATIONS))
        spec["combination"] = {"type": kind}
        if kind in DENSITY_COMBINATIONS or draw(st.booleans()):
            spec["combination"]["density"] = draw(sometimes(st.floats(0, 1, exclude_min=True), HOSTILE))
    return spec


@st.composite
def recipes(draw):
    """A plain mergekit config; two merge stages, the second merging the first's output; or an adapters stage
    (folded adapters are then merged)."""
    seed = draw(sometimes(st.sampled_from([None, 0, 7, MAX_SEED]), st.sampled_from([MAX_SEED + 1, -1, 2**70]), one_in=15))
    seeded = {"seed": seed} if seed is not None else {}
    form = draw(st.sampled_from(["plain", "two merges", "adapters"]))
    if form == "plain":
        return draw(merge_configs(FAMILY)) | seeded
    if form == "two merges":
        first = {"name": "first", "merge": draw(merge_configs(FAMILY))} | seeded
    else:
        first = {"name": "first", "adapters": draw(adapters_specs())} | seeded
        if first["adapters"]["mode"] == "combine":
            return {"stages": [first]}
    second = draw(merge_configs(["gemma3-base", "first", "gemma3-ft2"]))
    return {"stages": [first, {"name": "second", "merge": second}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_root):
    adapters = tmp_path_factory.mktemp("adapters")
    for name, options in LORAS.items():
        make_lora(model_root / "gemma3-base", adapters / name, **options)
    settings_ = Settings(home=tmp_path_factory.mktemp("home"), model_roots=[model_root, adapters], database_url=None)
    return settings_, Store(settings_)


# no shrinking (each example runs real merges) and no example database: a failing recipe is printed as it is
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=recipes())
def test_a_recipe_is_refused_with_problems_or_runs_to_finite_tensors(workspace, data):
    settings_, store = workspace
    note(f"recipe: {data!r}")
    try:
        recipe = check_recipe(data, settings_, store, default_name="generated")
    except RecipeError as exc:
        event("refused")
        assert exc.problems
        for problem in exc.problems:
            assert problem.loc or problem.msg
            assert not UNENCODABLE.search(problem.loc + problem.msg), problem
        return
    event("ran")
    for result in run_recipe(recipe, settings_, store):  # any exception here is a check validation lacks
        for file in sorted(store.path_of(result.model).glob("*.safetensors")):  # a model's or an adapter's
            for name, tensor in load_file(file).items():
                assert torch.isfinite(tensor).all(), f"{result.stage}: {name} in {file.name} is not finite"
