"""Commands that answer at once: checking a recipe (merges by merger's engine's methods included), reading the
store and rerunning a cached merge import no torch, mergekit, transformers, PEFT or torchao, and the libraries
print nothing of their own (warnings, library-load failures, progress bars) unless ``--verbose``. Each case runs
the real command line in a fresh interpreter that writes down, on exit, every module it imported."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.service_harness import BIN
from tests.test_cli_errors import env  # noqa: F401 - the fixture
from tests.tiny_models import make_lora

HEAVY = {"torch", "mergekit", "transformers", "peft", "torchao"}
TRACE = """\
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["TRACE_MODULES"], "w").write(json.dumps(sorted(sys.modules))))
from merger.cli import main
sys.argv[0] = "merger"
main()
"""


def traced(tmp_path, *args, env: dict) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``merger ARGS``; its output and the top-level packages it imported."""
    modules = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", TRACE, *map(str, args)], env={**env, "TRACE_MODULES": str(modules)},
                          capture_output=True, text=True, timeout=300)
    return done, {name.split(".")[0] for name in json.loads(modules.read_text())}


def test_validating_a_recipe_without_merges_imports_no_torch_nor_mergekit(tmp_path, env, model_root):
    make_lora(model_root / "llama-base", tmp_path / "lora", seed=1)
    (tmp_path / "words.txt").write_text(" ".join(f"w{4 + i % 60}" for i in range(200)))
    recipe = tmp_path / "tuned.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "tuned", "adapters": {"base": "llama-base", "mode": "fold", "adapters": [{"path": "lora"}]}},
        {"name": "scores", "evaluate": {"models": ["tuned"], "perplexity": ["words.txt"]}}]}))
    done, imported = traced(tmp_path, "validate", recipe, env=env)
    assert done.returncode == 0 and "2 stage(s): tuned, scores" in done.stdout, done.stderr
    assert done.stderr == ""
    assert imported & HEAVY == set()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("words.txt", "missing.txt"))
    done, imported = traced(tmp_path, "validate", bad, env=env)
    assert done.returncode == 2 and "stages[1].evaluate.perplexity[0]" in done.stderr and imported & HEAVY == set()


@pytest.mark.parametrize("method, parameters", [
    ("linear", {"weight": 0.5}), ("ties", {"weight": 0.5, "density": 0.5}), ("dare_ties", {"weight": 0.5, "density": 0.5}), ("slerp", {})])
def test_validating_a_merge_of_the_engines_methods_imports_no_torch_nor_mergekit(tmp_path, env, method, parameters):
    base = {} if method == "linear" else {"base_model": "gemma3-base"}
    shared = {"parameters": {"t": 0.5}} if method == "slerp" else {}
    models = ["gemma3-ft1"] if method == "slerp" else ["gemma3-ft1", "gemma3-ft2"]
    config = {"merge_method": method, **base, **shared, "models": [{"model": m, "parameters": dict(parameters)} for m in models]}
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump(config))
    done, imported = traced(tmp_path, "validate", recipe, env=env)
    assert done.returncode == 0 and "1 stage(s): merge" in done.stdout and done.stderr == "", done.stderr
    assert imported & HEAVY == set()
    config["models"][0] = {"model": "llama-ft1", "parameters": {**parameters, "density": 2}}
    config["dtype"] = "float8"
    recipe.write_text(yaml.safe_dump(config))
    done, imported = traced(tmp_path, "validate", recipe, env=env)
    assert done.returncode == 2 and imported & HEAVY == set(), done.stderr
    assert "stages[0].merge.dtype" in done.stderr and "stages[0].merge.models[0]" in done.stderr
    if "density" in parameters:  # a parameter of the method
        assert "stages[0].merge.models[0].parameters.density: 2 is out of range" in done.stderr


def test_store_commands_import_no_torch_nor_mergekit(tmp_path, env, model_root):
    subprocess.run([str(BIN / "merger"), "register", str(model_root / "llama-base"), "--name", "llama-base"],
                   env=env, check=True, capture_output=True)
    for args in (["models"], ["show", "llama-base"], ["lineage", "llama-base"], ["models", "--json"]):
        done, imported = traced(tmp_path, *args, env=env)
        assert done.returncode == 0 and "llama-base" in done.stdout and done.stderr == "", (args, done.stderr)
        assert imported & HEAVY == set(), args


def test_validating_a_merge_by_mergekit_prints_only_the_result(tmp_path, env):
    """A method merger's engine does not run is checked with mergekit's declaration of it: that imports mergekit and
    torch, whose warnings stay quiet."""
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "model_stock", "base_model": "gemma3-base",
                                      "models": [{"model": "gemma3-ft1"}, {"model": "gemma3-ft2"}]}))
    done, imported = traced(tmp_path, "validate", recipe, env=env)
    assert done.returncode == 0 and "ok" in done.stdout and done.stderr == "", done.stderr
    assert {"mergekit", "torch"} <= imported


def test_rerunning_a_cached_merge_imports_no_torch(tmp_path, env):
    """The first run merges (torch); the second finds the stage cached and answers with the same id, importing none of them."""
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": "gemma3-ft1", "parameters": {"weight": 0.5}}, {"model": "gemma3-ft2", "parameters": {"weight": 0.5}}]}))
    first, imported = traced(tmp_path, "run", recipe, env=env)
    assert first.returncode == 0 and "torch" in imported, first.stderr
    again, imported = traced(tmp_path, "run", recipe, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout and "cache hit" in again.stderr, again.stderr
    assert imported & HEAVY == set()
