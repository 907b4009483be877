"""The adapters stage: fold is the base plus every weighted LoRA update; combine is PEFT's
add_weighted_adapter; every mistake is named before any work."""

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merger.errors import RecipeError
from merger.orchestrator import check_recipe, run_recipe
from tests.tiny_models import make_lora


@pytest.fixture(scope="module")
def loras(model_root):
    """Two adapters for llama-base (ranks 4 and 8) and one of rank 4 with other targets."""
    made = {
        "lora-a": dict(seed=1, r=4),
        "lora-b": dict(seed=2, r=8, alpha=4, targets=("q_proj", "k_proj", "up_proj")),
        "lora-c": dict(seed=3, r=4, targets=("q_proj", "o_proj")),
    }
    for name, options in made.items():
        if not (model_root / name).exists():
            make_lora(model_root / "llama-base", model_root / name, **options)
    return model_root


def run(recipe, settings, store):
    return run_recipe(check_recipe(recipe, settings, store, default_name="r"), settings, store)


def adapters_stage(name, mode, adapters, base="llama-base", **extra):
    return {"name": name, "adapters": {"base": base, "mode": mode, "adapters": adapters, **extra}}


def test_fold_is_base_plus_weighted_updates(settings, store, loras):
    [result] = run({"stages": [adapters_stage("ab", "fold", [{"path": "lora-a", "weight": 1.0}, {"path": "lora-b", "weight": 0.5}])]}, settings, store)
    out = load_file(store.path_of(result.model) / "model.safetensors")
    base = load_file(loras / "llama-base" / "model.safetensors")
    by_hand = {name: w.float() for name, w in base.items()}
    touched = set()
    for adapter, weight in (("lora-a", 1.0), ("lora-b", 0.5)):
        config = json.loads((loras / adapter / "adapter_config.json").read_text())
        tensors = load_file(loras / adapter / "adapter_model.safetensors")
        scale = config["lora_alpha"] / config["r"]
        for key in tensors:
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
                by_hand[module + ".weight"] += weight * (b @ a) * scale
                touched.add(module + ".weight")
    assert touched and out.keys() == base.keys()
    for name in base:
        assert out[name].dtype == base[name].dtype == torch.bfloat16
        assert torch.equal(out[name], by_hand[name].to(torch.bfloat16)), name
    assert any(not torch.equal(out[n], base[n]) for n in touched)


def test_fold_in_steps_equals_fold_at_once(settings, store, loras):
    at_once = adapters_stage("both", "fold", [{"path": "lora-a"}, {"path": "lora-b", "weight": 0.7}])
    steps = [adapters_stage("a-only", "fold", [{"path": "lora-a"}], dtype="float32"),
             adapters_stage("then-b", "fold", [{"path": "lora-b", "weight": 0.7}], base="a-only", dtype="bfloat16", allow_other_base=True)]
    [both] = run({"stages": [at_once]}, settings, store)
    _, stepped = run({"stages": steps}, settings, store)
    one, two = (load_file(store.path_of(m.model) / "model.safetensors") for m in (both, stepped))
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_fold_matches_peft_merge_and_unload(settings, store, loras):
    [result] = run({"stages": [adapters_stage("a32", "fold", [{"path": "lora-a"}], dtype="float32")]}, settings, store)
    base = AutoModelForCausalLM.from_pretrained(loras / "llama-base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, loras / "lora-a").merge_and_unload().state_dict()
    ours = load_file(store.path_of(result.model) / "model.safetensors")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("combination", [
    {"type": "cat"},
    {"type": "svd", "svd_rank": 12},
    {"type": "ties", "density": 0.5},
])
def test_combine_equals_peft_add_weighted_adapter(settings, store, loras, combination):
    names = ["lora-a", "lora-c"] if combination["type"] == "ties" else ["lora-a", "lora-b"]  # ties needs equal ranks
    weights = [1.0, 0.6]
    stage = adapters_stage("combined", "combine", [{"path": n, "weight": w} for n, w in zip(names, weights, strict=True)], combination=combination)
    [result] = run({"stages": [stage]}, settings, store)
    assert result.model.kind == "adapter"
    ours = load_file(store.path_of(result.model) / "adapter_model.safetensors")

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loras / "llama-base", dtype=torch.float32),
                                      loras / names[0], adapter_name="x0")
    model.load_adapter(loras / names[1], adapter_name="x1")
    options = {k: v for k, v in combination.items() if k != "type"}
    model.add_weighted_adapter(["x0", "x1"], weights, "ref", combination_type=combination["type"], **options)
    reference = {k.replace(".ref.", "."): v for k, v in model.state_dict().items() if ".ref." in k}
    assert ours.keys() == {"base_model.model." + k.removeprefix("base_model.model.") for k in reference}
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key

    card = (store.path_of(result.model) / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model_relation"] == "adapter" and front["base_model"] == ["llama-base"]
    assert all(n in card for n in names)
    edges = [(e.parent.name, e.relation, e.role, e.weight) for e in result.model.parents]
    assert edges == [("llama-base", "adapter", "base", None)] + [(n, "adapter", "adapter", w) for n, w in zip(names, weights, strict=True)]


def test_combined_adapter_feeds_a_merge(settings, store, loras):
    recipe = {"stages": [
        adapters_stage("cat-ab", "combine", [{"path": "lora-a"}, {"path": "lora-b"}]),
        {"name": "merged", "merge": {"merge_method": "linear", "models": [
            {"model": "llama-base+cat-ab", "parameters": {"weight": 0.5}}, {"model": "llama-ft1", "parameters": {"weight": 0.5}}]}},
    ]}
    combined, merged = run(recipe, settings, store)
    adapter_edges = [e for e in merged.model.parents if e.role == "adapter"]
    assert [e.parent_id for e in adapter_edges] == [combined.model.id]


# --- mistakes, each named ---------------------------------------------------------------------------------


def problems(recipe, settings, store) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    return {p.loc: p.msg for p in caught.value.problems}


def _variant(loras, source: str, name: str, *, config: dict | None = None, rename: tuple[str, str] | None = None, pickle: bool = False):
    target = loras / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(loras / source, target)
    if config:
        path = target / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if rename:
        tensors = load_file(target / "adapter_model.safetensors")
        save_file({k.replace(*rename): v for k, v in tensors.items()}, target / "adapter_model.safetensors")
    if pickle:
        (target / "adapter_model.safetensors").unlink()
        torch.save({}, target / "adapter_model.bin")
    return name


def _wide_llama(root) -> str:
    """llama-base with a wider MLP: lora-a's down_proj A no longer fits."""
    from tests.tiny_models import save_model, tiny_config

    if not (root / "llama-wide-mlp").exists():
        save_model(AutoModelForCausalLM.from_config(tiny_config("llama", intermediate_size=96)), root / "llama-wide-mlp")
    return "llama-wide-mlp"


def test_every_adapter_mistake_is_named(settings, store, loras, model_root):
    other_base = _variant(loras, "lora-a", "lora-other-base", config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    missing = _variant(loras, "lora-a", "lora-missing", rename=("q_proj", "qq_proj"))
    dora = _variant(loras, "lora-a", "lora-dora", config={"use_dora": True})
    pickled = _variant(loras, "lora-a", "lora-pickled", pickle=True)
    ia3 = _variant(loras, "lora-a", "lora-ia3", config={"peft_type": "IA3"})
    fold = adapters_stage("f", "fold", [{"path": p} for p in (other_base, missing, dora, pickled, ia3)])
    ties = adapters_stage("t", "combine", [{"path": "lora-a"}, {"path": "lora-b"}], combination={"type": "ties", "density": 0.5})
    wrong_shape = adapters_stage("w", "fold", [{"path": "lora-a"}], base=_wide_llama(model_root), allow_other_base=True)
    found = problems({"stages": [fold, ties, wrong_shape]}, settings, store)
    expect = {
        "stages[0].adapters.adapters[0].path": "was made for 'meta-llama/Llama-3.2-1B', but the base is 'llama-base'",
        "stages[0].adapters.adapters[1].path": "targets modules the base lacks: model.layers.0.self_attn.qq_proj",
        "stages[0].adapters.adapters[2].path": "DoRA",
        "stages[0].adapters.adapters[3].path": "adapter_model.bin",
        "stages[0].adapters.adapters[4].path": "only LoRA adapters are supported",
        "stages[1].adapters.adapters[1].path": "rank 8 differs from the first adapter's 4; ties needs equal ranks",
        "stages[2].adapters.adapters[0].path": "don't fit the base weight",
    }
    for loc, fragment in expect.items():
        assert fragment in found.get(loc, ""), (loc, found)


def test_extract_lora_recovers_a_low_rank_fine_tune(settings, store, loras):
    low_rank = "lora-rank2"
    if not (loras / low_rank).exists():
        make_lora(loras / "llama-base", loras / low_rank, seed=5, r=2, alpha=2)
    recipe = {"stages": [
        adapters_stage("ft", "fold", [{"path": low_rank}], dtype="float32"),
        {"name": "extracted", "extract_lora": {"model": "ft", "base": "llama-base", "rank": 4}},
        adapters_stage("refolded", "fold", [{"path": "extracted"}], dtype="float32"),
    ]}
    ft, extracted, refolded = run(recipe, settings, store)
    assert extracted.model.kind == "adapter"
    config = json.loads((store.path_of(extracted.model) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "llama-base" and config["r"] <= 4
    assert [(e.parent.name, e.relation, e.role) for e in extracted.model.parents] == [("llama-base", "adapter", "base"), ("ft", "adapter", "donor")]
    want = load_file(store.path_of(ft.model) / "model.safetensors")
    got = load_file(store.path_of(refolded.model) / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4)
