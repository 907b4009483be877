"""A bad recipe gets every problem reported with its field path, exit code 2, and no traceback."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merger.errors import RecipeError
from merger.orchestrator import check_recipe
from tests.tiny_models import write_yaml

MERGER = str(Path(sys.executable).parent / "merger")

BAD_RECIPE = {
    "stages": [
        {
            "name": "first",
            "merge": {
                "merge_method": "ties",
                "base_model": "gemma3-base",
                "models": [
                    {"model": "gemma3-ft1", "parameters": {"weight": 0.5, "densty": 0.5}},  # 1 unknown parameter
                    {"model": "no-such-model"},  # 2 unresolvable reference
                ],
                "dtpye": "bfloat16",  # 3 unknown field
            },
        },
        {"name": "second", "merge": {"merge_method": "tiez", "models": [{"model": "first"}]}},  # 4 unknown method
        {"name": "third", "merge": {"merge_method": "linear", "models": [{"model": "llama-ft1"}, {"model": "first"}]}},  # 5 architecture
        {"name": "fourth", "mrege": {}},  # 6 no stage kind
    ]
}

EXPECTED = {
    "stages[0].merge.models[0].parameters.densty": "unknown parameter",
    "stages[0].merge.models[1].model": "not a stage, a stored model, or a directory",
    "stages[0].merge.dtpye": "unknown field",
    "stages[1].merge.merge_method": "unknown merge method 'tiez'",
    "stages[2].merge.models[1].model": "architecture",
    "stages[3]": "exactly one kind",
}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MERGER, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_every_problem_reported_with_its_path(settings, store):
    with pytest.raises(RecipeError) as caught:
        check_recipe(BAD_RECIPE, settings, store, default_name="bad")
    problems = {p.loc: p.msg for p in caught.value.problems}
    for loc, fragment in EXPECTED.items():
        assert fragment in problems.get(loc, ""), (loc, problems)


def test_cli_validate_reports_all_problems_exit_2_no_traceback(settings, tmp_path):
    recipe = write_yaml(tmp_path / "bad.yaml", BAD_RECIPE)
    result = run_cli("validate", str(recipe), "--json")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    problems = {p["loc"]: p["msg"] for p in json.loads(result.stdout)["problems"]}
    for loc, fragment in EXPECTED.items():
        assert loc in problems, f"{loc} not reported; got {sorted(problems)}"
        assert fragment in problems[loc], (loc, problems[loc])

    human = run_cli("validate", str(recipe))
    assert human.returncode == 2 and "Traceback" not in human.stderr
    assert all(loc in human.stderr for loc in EXPECTED)


def test_shape_mismatch_is_found_from_headers(settings, store, model_root, tmp_path):

    # a same-architecture model with a different width, under the same root
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_root / "llama-base")
    cfg.intermediate_size = 96
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    from tests.tiny_models import save_model

    save_model(model, model_root / "llama-wide")
    recipe = {"merge_method": "linear", "parameters": {"weight": 1}, "models": [{"model": "llama-base"}, {"model": "llama-wide"}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="w")
    [problem] = caught.value.problems
    assert problem.loc == "stages[0].merge.models[1].model"
    assert "mlp.up_proj.weight [96, 32] vs base [64, 32]" in problem.msg


# --- values: every one of the values refused at once, with its path --------------------------------

BAD_VALUES = {
    "stages": [
        {"name": "values", "seed": 2**70, "merge": {
            "merge_method": "ties", "base_model": "gemma3-base", "dtype": "float33", "out_dtype": "int8",
            "models": [{"model": "gemma3-ft1", "parameters": {"weight": "heavy", "density": 2}},
                       {"model": "gemma3-ft2", "parameters": {"weight": [0.1, "x"], "density": -1}}]}},
        {"name": "no-t", "merge": {"merge_method": "slerp", "base_model": "gemma3-base",
                                   "models": [{"model": "gemma3-base"}, {"model": "gemma3-ft1"}]}},
        {"name": "big-t", "merge": {"merge_method": "slerp", "base_model": "gemma3-base", "parameters": {"t": 5},
                                    "models": [{"model": "gemma3-base"}, {"model": "gemma3-ft1"}]}},
        {"name": "weights", "merge": {"merge_method": "linear", "models": [
            {"model": "gemma3-ft1", "parameters": {"weight": float("nan")}},
            {"model": "gemma3-ft2", "parameters": {"weight": 1e308}}]}},
        {"name": "nul", "merge": {"merge_method": "linear", "dtype": "a\u0000b", "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}]}},
        {"name": "surrogate", "merge": {"merge_method": "linear", "models": [{"model": "gemma3-\ud800", "parameters": {"weight": 1}}]}},
    ]
}

BAD_VALUES_EXPECTED = {
    "stages[0].seed": "less than or equal to 4294967295",
    "stages[0].merge.dtype": "unknown dtype 'float33'; allowed: bfloat16, float32, float64",
    "stages[0].merge.out_dtype": "unknown dtype 'int8'",
    "stages[0].merge.models[0].parameters.weight": "'heavy' is not a number",
    "stages[0].merge.models[1].parameters.weight[1]": "'x' is not a number",
    "stages[0].merge.models[0].parameters.density": "2 is out of range: density (the fraction of each task vector kept) is in (0, 1]",
    "stages[0].merge.models[1].parameters.density": "-1 is out of range",
    "stages[1].merge.parameters.t": "slerp needs t",
    "stages[2].merge.parameters.t": "5 is out of range: t (interpolates from the base (0) to the other model (1)) is in [0, 1]",
    "stages[3].merge.models[0].parameters.weight": "nan is not a finite number",
    "stages[3].merge.models[1].parameters.weight": "1e+308 is out of range: weight (the input's weight) is in [-1000, 1000]",
    "stages[4].merge.dtype": "a NUL character in 'a\\x00b'",
    "stages[5].merge.models[0].model": "a lone surrogate (not valid Unicode) in 'gemma3-\\ud800'",
}


def _problems(recipe, settings, store) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="bad")
    problems = caught.value.problems
    for problem in problems:  # what the CLI prints, the API returns and a database stores: encodable text
        assert "\x00" not in problem.loc + problem.msg
        (problem.loc + problem.msg).encode("utf-8")
    by_loc: dict[str, str] = {}
    for problem in problems:
        by_loc[problem.loc] = f"{by_loc[problem.loc]} | {problem.msg}" if problem.loc in by_loc else problem.msg
    return by_loc


def test_every_bad_value_refused_at_once_with_its_path(settings, store):
    problems = _problems(BAD_VALUES, settings, store)
    for loc, fragment in BAD_VALUES_EXPECTED.items():
        assert fragment in problems.get(loc, ""), (loc, problems)


def test_nul_and_surrogates_refused_in_keys_and_at_any_depth(settings, store):
    recipe = {"merge_method": "linear", "models": [{"model": "gemma3-ft1", "parameters": {"weight": [{"filter": "ml\x00p", "value": 1}]}}],
              "chat_template": "{{ x }}\ud800", "k\x00ey": 1}
    problems = _problems(recipe, settings, store)
    assert "a NUL character" in problems["stages[0].merge.models[0].parameters.weight[0].filter"]
    assert "a lone surrogate" in problems["stages[0].merge.chat_template"]
    assert "a NUL character in this key" in problems["stages[0].merge.k\\x00ey"]


@pytest.mark.parametrize("setting, loc, fragment", [
    ({"filter": "mlp", "value": "inf"}, "weight.value", "'inf' is not a finite number"),
    ([{"filter": "mlp", "value": [0.5, True]}, {"value": 1}], "weight[0].value[1]", "must be a number, not true"),
    ([], "weight", "an empty gradient"),
    ([[0.5]], "weight[0]", "must be a number (a gradient is a flat list of values)"),
    ({"value": {"value": 1}}, "weight.value", "not another conditional"),
    ({"filter": "mlp", "valeu": 1}, "weight.valeu", "unknown field"),
])
def test_a_value_is_checked_in_every_form(settings, store, setting, loc, fragment):
    recipe = {"merge_method": "task_arithmetic", "base_model": "gemma3-base",
              "models": [{"model": "gemma3-ft1", "parameters": {"weight": setting}}]}
    problems = _problems(recipe, settings, store)
    assert fragment in problems.get(f"stages[0].merge.models[0].parameters.{loc}", ""), problems


def test_values_are_checked_at_every_level(settings, store):
    recipe = {"merge_method": "ties", "base_model": "gemma3-base", "parameters": {"lambda": 1e9, "weight": 1},
              "slices": [{"parameters": {"density": 0}, "sources": [
                  {"model": "gemma3-base", "layer_range": [0, 4]},
                  {"model": "gemma3-ft1", "layer_range": [0, 4], "parameters": {"density": "x", "lambda": 1}}]}]}
    problems = _problems(recipe, settings, store)
    assert "out of range" in problems["stages[0].merge.parameters.lambda"]
    assert "0 is out of range" in problems["stages[0].merge.slices[0].parameters.density"]
    assert "'x' is not a number" in problems["stages[0].merge.slices[0].sources[1].parameters.density"]
    assert "one value for all inputs" in problems["stages[0].merge.slices[0].sources[1].parameters.lambda"]


def test_every_parameter_of_every_method_has_a_rule():
    from mergekit.merge_methods.registry import registered_methods

    from merger.recipe import parameter_rule

    for method in registered_methods():
        for spec in method.spec.parameters:
            rule = parameter_rule(method.spec.name, spec.name)
            assert rule.kind == "boolean" or rule.low > -math.inf and rule.high < math.inf, (method.spec.name, spec.name)


def test_required_parameters_of_every_method(settings, store):
    """Each method's required parameters, as mergekit's specs declare them, are asked for where they are missing."""
    from mergekit.merge_methods.base import ParameterScope
    from mergekit.merge_methods.registry import registered_methods

    required = {m.spec.name: [p for p in m.spec.parameters if p.required] for m in registered_methods()}
    assert {name for name, specs in required.items() if specs} >= {"linear", "slerp", "ties", "nuslerp", "nearswap"}
    for name, specs in required.items():
        if not specs:
            continue
        recipe = {"merge_method": name, "base_model": "gemma3-base", "models": [{"model": "gemma3-ft1"}, {"model": "gemma3-ft2"}]}
        problems = _problems(recipe, settings, store)
        for spec in specs:
            where = "parameters" if spec.scope == ParameterScope.SHARED else "models[1].parameters"
            assert "needs" in problems.get(f"stages[0].merge.{where}.{spec.name}", ""), (name, spec.name, problems)


@pytest.mark.parametrize("merge, loc, fragment", [
    ({"merge_method": "model_stock", "base_model": "gemma3-base", "models": [{"model": "gemma3-ft1"}]}, "models", "at least 3 inputs"),
    ({"merge_method": "passthrough", "models": [{"model": "gemma3-ft1"}, {"model": "gemma3-ft2"}]}, "models", "exactly 1 inputs"),
    ({"merge_method": "slerp", "base_model": "gemma3-base", "parameters": {"t": 0.5},
      "models": [{"model": "gemma3-ft1"}, {"model": "gemma3-ft2"}]}, "models", "exactly 2 inputs"),
    ({"merge_method": "ties", "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}]}, "base_model", "ties needs a base_model"),
    ({"merge_method": "linear", "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}, {"model": "gemma3-ft1", "parameters": {"weight": 1}}]},
     "models", "Duplicate merge inputs"),
    ({"merge_method": "linear", "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}, {"model": "gemma3-ft2", "parameters": {"weight": -1}}]},
     "models[1].parameters.weight", "weights are 0 or more (set normalize: false"),
    ({"merge_method": "linear", "models": [{"model": "gemma3-ft1", "parameters": {"weight": [1, 0, 0]}}, {"model": "gemma3-ft2", "parameters": {"weight": [0, 0, 1]}}]},
     "models", "can be 0 (every weight is 0 at gradient position 0.5)"),
    ({"merge_method": "linear", "parameters": {"weight": 1e-300}, "models": [{"model": "gemma3-ft1"}]},
     "models", "can be 0 (every weight is 0 at gradient position 0)"),
    ({"merge_method": "della", "base_model": "gemma3-base", "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1, "density": 0.9}}]},
     "models[0].parameters.density", "with epsilon 0.15, a density below 1 is in (0.15, 0.85)"),
    ({"merge_method": "linear", "tokenizer": {"source": "gemma3-ft1+gemma3-ft2", "pad_to_multiple_of": -8},
      "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}]}, "tokenizer.source", "not model+lora"),
    ({"merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": -8},
      "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}]}, "tokenizer.pad_to_multiple_of", "from 1 to 1024"),
])
def test_what_mergekit_would_refuse_late_is_refused_now(settings, store, merge, loc, fragment):
    problems = _problems(merge, settings, store)
    assert fragment in problems.get(f"stages[0].merge.{loc}", ""), problems


@pytest.mark.parametrize("merge", [
    {"merge_method": "linear", "models": [{"model": "gemma3-ft1", "parameters": {"weight": [1, 0]}}, {"model": "gemma3-ft2", "parameters": {"weight": [0, 1]}}]},
    {"merge_method": "linear", "parameters": {"normalize": False}, "models": [{"model": "gemma3-ft1", "parameters": {"weight": 1}}, {"model": "gemma3-ft2", "parameters": {"weight": -0.5}}]},
    {"merge_method": "della", "base_model": "gemma3-base", "models": [{"model": "gemma3-ft1", "parameters": {"weight": "1e-1", "density": [0.5, 0.8], "epsilon": 0.1}}]},
    {"merge_method": "slerp", "base_model": "gemma3-base", "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 1}]},
     "models": [{"model": "gemma3-base"}, {"model": "gemma3-ft1"}], "dtype": "float64", "seed": 2**32 - 1},
])
def test_values_at_their_bounds_are_valid(settings, store, merge):
    check_recipe(merge, settings, store, default_name="ok")
