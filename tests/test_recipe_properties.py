"""Generated recipes either fail validation with problems, or run to the end and make only finite tensors.

Hypothesis writes mergekit configs over the tiny test models: every merge method, models or slices, parameters
at every level (top, per model, per slice and source) as values, gradients or ``{filter, value}`` conditionals,
valid values and hostile ones (NaN, inf, 1e308, words, booleans, nesting, NUL, lone surrogates), dtypes, seeds,
tokenizer sources, and sometimes a second stage that merges the first. Validation must see every reason a run
would fail: a validated recipe that then fails, or makes a NaN or inf, is a bug in the checks.
``MERGER_RECIPE_EXAMPLES`` raises the number of examples (default 40) to hunt for more.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods.registry import registered_methods
from safetensors.torch import load_file

from merger.errors import UNENCODABLE, RecipeError
from merger.orchestrator import check_recipe, run_recipe
from merger.recipe import MAX_SEED, parameter_rule
from merger.settings import Settings
from merger.store import Store

METHODS = {m.spec.name: m for m in registered_methods()}
FAMILY = ["gemma3-base", "gemma3-ft1", "gemma3-ft2"]
LAYERS = 4  # tiny_models.tiny_config
EXAMPLES = int(os.environ.get("MERGER_RECIPE_EXAMPLES", "40"))

HOSTILE = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 2**70, -1, 2, 5, "heavy", "x", "nan", "1e-3", True, None,
    [], [[0.5]], [0.1, "x"], {"value": 0.5, "filter": "mlp"}, {"filter": "mlp"}, {"value": {"value": 1}}, "a\x00b", "\ud800",
])


def valid_value(method: str, name: str):
    rule = parameter_rule(method, name)
    if rule.kind == "boolean":
        return st.booleans()
    if rule.kind == "integer":
        return st.integers(int(rule.low), min(int(rule.high), 20))
    return st.floats(rule.low, rule.high, exclude_min=rule.low_open) | st.sampled_from([rule.low, rule.high])


def setting(method: str, name: str):
    value = valid_value(method, name)
    gradient = st.lists(value, min_size=1, max_size=4)
    conditional = st.fixed_dictionaries({"filter": st.sampled_from(["mlp", "self_attn", "*", "embed"]), "value": value | gradient})
    return st.one_of(value, gradient, st.lists(conditional, min_size=1, max_size=3), conditional, HOSTILE)


def parameters(method: str):
    names = [p.name for p in METHODS[method].spec.parameters]
    settings_of = {name: setting(method, name) for name in names} | {"densty": st.just(0.5)}
    keys = st.lists(st.sampled_from(sorted(settings_of)), unique=True, max_size=4)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: settings_of[k] for k in ks}))


@st.composite
def merge_configs(draw, family=FAMILY):
    method = draw(st.sampled_from(sorted(METHODS)))
    models = draw(st.lists(st.sampled_from(family), min_size=1, max_size=3, unique=True))
    config = {"merge_method": method}
    base = draw(st.sampled_from([None, family[0], *models]))
    if base is not None:
        config["base_model"] = base
    if draw(st.booleans()):
        config["models"] = [{"model": m, **({"parameters": draw(parameters(method))} if draw(st.booleans()) else {})} for m in models]
    else:
        cut = draw(st.sampled_from([LAYERS, 1, 2]))
        ranges = [[0, LAYERS]] if cut == LAYERS else [[0, cut], [cut, LAYERS]]
        config["slices"] = [
            {"sources": [{"model": m, "layer_range": r, **({"parameters": draw(parameters(method))} if draw(st.booleans()) else {})} for m in models],
             **({"parameters": draw(parameters(method))} if draw(st.booleans()) else {})}
            for r in ranges
        ]
    if draw(st.booleans()):
        config["parameters"] = draw(parameters(method))
    for key in ("dtype", "out_dtype"):
        dtype = draw(st.sampled_from([None, "bfloat16", "float32", "float16", "float64", "torch.float32", "float33", "int8", "a\x00b"]))
        if dtype is not None:
            config[key] = dtype
    tokenizer = draw(st.sampled_from([None, "base", "union", family[1], f"{family[1]}+{family[2]}"]))
    if tokenizer is not None:
        config["tokenizer_source"] = tokenizer
    return config


@st.composite
def recipes(draw):
    first = draw(merge_configs())
    seed = draw(st.sampled_from([None, 0, 7, MAX_SEED, MAX_SEED + 1, -1, 2**70]))
    if not draw(st.booleans()):
        return first | ({"seed": seed} if seed is not None else {})
    stage = {"name": "first", "merge": first} | ({"seed": seed} if seed is not None else {})
    second = draw(merge_configs(family=["gemma3-base", "first", "gemma3-ft2"]))
    return {"stages": [stage, {"name": "second", "merge": second}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_root):
    settings_ = Settings(home=tmp_path_factory.mktemp("home"), model_roots=[model_root], database_url=None)
    return settings_, Store(settings_)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=recipes())
def test_a_recipe_is_refused_with_problems_or_runs_to_finite_tensors(workspace, data):
    settings_, store = workspace
    try:
        recipe = check_recipe(data, settings_, store, default_name="generated")
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.loc or problem.msg
            assert not UNENCODABLE.search(problem.loc + problem.msg), problem
        return
    for result in run_recipe(recipe, settings_, store):  # any exception here is a check validation lacks
        for file in sorted(store.path_of(result.model).glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                assert torch.isfinite(tensor).all(), f"{result.stage}: {name} in {file.name} is not finite"
