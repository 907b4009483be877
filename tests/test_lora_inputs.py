"""`model+adapter` inputs: the LoRA is folded (in float32) before merging, and recorded in lineage."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merger.errors import RecipeError
from merger.orchestrator import check_recipe, run_recipe


@pytest.fixture(scope="module")
def tiny_lora(model_root):
    path = model_root / "llama-lora"
    if not path.exists():
        torch.manual_seed(3)
        base = AutoModelForCausalLM.from_pretrained(model_root / "llama-base", dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)  # B starts at zero; make the adapter do something
        peft_model.save_pretrained(path)
    return path


def test_lora_input_equals_peft_fold(settings, store, model_root, tiny_lora):
    recipe = {"merge_method": "linear", "models": [{"model": "llama-base+llama-lora", "parameters": {"weight": 1.0}}]}
    [result] = run_recipe(check_recipe(recipe, settings, store, default_name="folded"), settings, store)

    base = AutoModelForCausalLM.from_pretrained(model_root / "llama-base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, tiny_lora).merge_and_unload().state_dict()  # float32 fold
    ours = load_file(store.path_of(result.model) / "model.safetensors")
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
        changed += "q_proj" in name or "v_proj" in name or "down_proj" in name
    assert changed  # the adapter's modules are among those compared

    edges = {(e.relation, e.role): e for e in result.model.parents}
    assert edges[("adapter", "adapter")].parent.kind == "adapter"
    assert edges[("adapter", "adapter")].details["applied_to"] == edges[("merge", "donor")].details["loc"]


def test_adapter_without_safetensors_is_refused(settings, store, model_root, tiny_lora):
    import shutil

    broken = model_root / "llama-lora-pickled"
    shutil.copytree(tiny_lora, broken, dirs_exist_ok=True)
    (broken / "adapter_model.safetensors").unlink()
    torch.save({}, broken / "adapter_model.bin")
    recipe = {"merge_method": "linear", "models": [{"model": "llama-base+llama-lora-pickled", "parameters": {"weight": 1.0}}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="x")
    assert "adapter_model.bin" in str(caught.value) and "pickle" in str(caught.value)
