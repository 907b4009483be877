"""Untrusted input is refused with a clear error: pickles, paths outside the roots, YAML bombs, huge recipes."""

import shutil

import pytest
import torch

from merger.errors import RecipeError
from merger.orchestrator import check_recipe, load_and_check
from merger.safe_yaml import load_recipe_text


def problems_of(recipe, settings, store) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    return {p.loc: p.msg for p in caught.value.problems}


def test_pickle_checkpoint_is_refused_by_name(settings, store, model_root):
    pickled = model_root / "llama-pickled"
    shutil.copytree(model_root / "llama-ft1", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    problems = problems_of({"merge_method": "linear", "models": [{"model": "llama-ft1"}, {"model": "llama-pickled"}]}, settings, store)
    msg = problems["stages[0].merge.models[1].model"]
    assert "pytorch_model.bin" in msg and "pickle" in msg


def test_remote_code_config_is_refused_by_name(settings, store, model_root):
    import json

    remote = model_root / "llama-remote-code"
    shutil.copytree(model_root / "llama-ft1", remote, dirs_exist_ok=True)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    problems = problems_of({"merge_method": "linear", "models": [{"model": "llama-ft1"}, {"model": "llama-remote-code"}]}, settings, store)
    msg = problems["stages[0].merge.models[1].model"]
    assert "auto_map in config.json" in msg and "never runs remote code" in msg


def test_model_with_python_files_is_refused_by_name(settings, store, model_root):
    shipped_code = model_root / "llama-python-code"
    shutil.copytree(model_root / "llama-ft1", shipped_code, dirs_exist_ok=True)
    (shipped_code / "modeling_evil.py").write_text("import os\n")
    problems = problems_of({"merge_method": "linear", "models": [{"model": "llama-ft1"}, {"model": "llama-python-code"}]}, settings, store)
    assert "holds Python code (modeling_evil.py)" in problems["stages[0].merge.models[1].model"]


@pytest.fixture
def outside(tmp_path, model_root):
    """A valid model and adapter outside the model roots, reachable by ../ and by absolute path."""
    target = tmp_path / "outside-model"
    shutil.copytree(model_root / "llama-ft1", target)
    return target


def _escapes(outside, model_root):
    relative = "../" * len(model_root.parts) + str(outside).lstrip("/")
    return {"relative": relative, "absolute": str(outside)}


PATH_FIELDS = {
    "models[].model": lambda p: {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": "llama-ft1"}, {"model": p}]},
    "base_model": lambda p: {"merge_method": "task_arithmetic", "base_model": p, "models": [{"model": "llama-ft1", "parameters": {"weight": 1.0}}]},
    "slices[].sources[].model": lambda p: {"merge_method": "passthrough", "slices": [{"sources": [{"model": p, "layer_range": [0, 2]}]}]},
    "lora": lambda p: {"merge_method": "linear", "models": [{"model": f"llama-ft1+{p}", "parameters": {"weight": 1.0}}]},
    "tokenizer_source": lambda p: {"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 1.0}}], "tokenizer_source": p},
    "chat_template": lambda p: {"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 1.0}}], "chat_template": p + "/template.jinja"},
}


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_paths_outside_the_roots_are_refused(field, how, settings, store, model_root, outside):
    (outside / "template.jinja").write_text("{{ secret }}")
    path = _escapes(outside, model_root)[how]
    problems = problems_of(PATH_FIELDS[field](path), settings, store)
    assert len(problems) == 1, problems
    [(loc, msg)] = problems.items()
    assert "outside the model roots" in msg, msg
    assert str(model_root) in msg


def test_symlink_out_of_the_roots_is_refused(settings, store, model_root, outside):
    link = model_root / "sneaky-link"
    link.symlink_to(outside)
    try:
        problems = problems_of({"merge_method": "linear", "models": [{"model": "llama-ft1"}, {"model": "sneaky-link"}]}, settings, store)
    finally:
        link.unlink()
    assert "outside the model roots" in problems["stages[0].merge.models[1].model"]


def test_yaml_alias_bomb_is_refused(settings, tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(bomb, source="bomb.yaml", max_bytes=settings.max_recipe_bytes)
    assert "anchors are not allowed" in str(caught.value) or "aliases are not allowed" in str(caught.value)


def test_recipe_over_the_size_cap_is_refused(settings, store, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGER_MAX_RECIPE_BYTES", "1000")
    from merger.settings import Settings

    small = Settings()
    recipe = tmp_path / "big.yaml"
    recipe.write_text("merge_method: linear\n# " + "x" * 2000 + "\nmodels: [{model: llama-ft1}]\n")
    with pytest.raises(RecipeError) as caught:
        load_and_check(recipe, small, store)
    assert "over the 1000-byte limit" in str(caught.value)
