"""A bad recipe gets every problem reported with its field path, exit code 2, and no traceback."""

import json
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
    recipe = {"merge_method": "linear", "models": [{"model": "llama-base"}, {"model": "llama-wide"}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="w")
    [problem] = caught.value.problems
    assert problem.loc == "stages[0].merge.models[1].model"
    assert "mlp.up_proj.weight [96, 32] vs base [64, 32]" in problem.msg
