"""The quantize stage: GGUF files by llama.cpp's tools, read back and checked against their source, and
torchao int8 directories that transformers loads; lineage, card and every problem named."""

import os

import numpy as np
import pytest
import torch
import yaml
from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map, quants
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merger.errors import RecipeError
from merger.orchestrator import check_recipe, run_recipe
from merger.settings import Settings
from merger.store import Store
from tests.tiny_models import make_lora, make_sentencepiece_model

PROMPT = "the quick brown fox jumps over a lazy dog"


@pytest.fixture(scope="session")
def spm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-models")
    for arch in ("gemma3", "llama"):
        make_sentencepiece_model(root, arch)
    make_lora(root / "gemma3-spm", root / "gemma3-lora", seed=1)
    return root.resolve()


@pytest.fixture
def q_settings(settings, spm_root, model_root, monkeypatch):
    monkeypatch.setenv("MERGER_MODEL_ROOTS", os.pathsep.join(map(str, (spm_root, model_root))))
    return Settings()


def quantize(settings, model: str, type_: str, format_: str = "gguf"):
    recipe = {"stages": [{"name": f"q-{type_.lower()}", "quantize": {"model": model, "format": format_, "type": type_}}]}
    store = Store(settings)
    [result] = run_recipe(check_recipe(recipe, settings, store, default_name="q"), settings, store)
    return store, result.model, store.path_of(result.model)


def gguf_tensors(path, arch: MODEL_ARCH, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
    """(GGUF type, source values, dequantized values) for each source weight the converter stores unchanged."""
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    names = get_tensor_name_map(arch, 2)
    for hf_name, weight in source.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None or "norm" in name or any(s in name for s in skip):  # Gemma norms are stored +1
            continue
        tensor = by_name[name]
        yield tensor.tensor_type.name, weight.float().numpy(), quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)


def test_q8_0_gguf_is_within_the_format_bound_and_recorded_as_quantized(q_settings, spm_root):
    store, model, out = quantize(q_settings, "gemma3-spm", "Q8_0")
    [gguf_file] = out.glob("*.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "q-q8_0.Q8_0.gguf"]
    assert GGUFReader(gguf_file).get_field("general.architecture").contents() == "gemma3"

    source = load_file(spm_root / "gemma3-spm" / "model.safetensors")
    checked = 0
    for gguf_type, x, dequantized in gguf_tensors(gguf_file, MODEL_ARCH.GEMMA3, source):
        assert gguf_type == "Q8_0"
        # Q8_0: blocks of 32 share d = max|x| / 127 (stored as fp16): |error| <= d/2 + 127 * (fp16 rounding of d)
        blocks, error = x.reshape(-1, 32), np.abs(dequantized - x).reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1) / 127 * (0.5 + 127 * 2.0 ** -11)
        assert (error.max(axis=1) <= bound + 1e-12).all()
        checked += 1
    assert checked == 15  # embeddings + 7 projections in each of 2 layers

    [edge] = store.get(model.id).parents
    assert (edge.relation, edge.role, edge.parent.name) == ("quantized", "base", "gemma3-spm")
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model_relation"] == "quantized" and front["library_name"] == "gguf"
    assert front["base_model"] == ["gemma3-spm"]
    assert {"llama-cpp-python", "torchao"} <= set(store.get(model.id).versions)


def test_q4_k_m_uses_k_quants_within_one_and_a_half_steps(q_settings, spm_root):
    _, _, out = quantize(q_settings, "llama-spm", "Q4_K_M")
    [gguf_file] = out.glob("*.gguf")
    source = load_file(spm_root / "llama-spm" / "model.safetensors")
    levels = {"Q4_K": 15, "Q5_0": 31, "Q5_K": 31, "Q6_K": 63, "Q8_0": 255}
    seen = set()
    # llama.cpp permutes Llama's q/k rows; the other weights are stored in order
    for gguf_type, x, dequantized in gguf_tensors(gguf_file, MODEL_ARCH.LLAMA, source, skip=("attn_q", "attn_k")):
        seen.add(gguf_type)
        blocks, error = x.reshape(-1, 32), np.abs(dequantized - x).reshape(-1, 32)
        step = (blocks.max(axis=1) - blocks.min(axis=1)) / levels[gguf_type]
        assert (error.max(axis=1) <= 1.5 * step + 1e-6).all(), gguf_type
    assert "Q4_K" in seen and "Q6_K" in seen  # Q4_K_M: Q4_K, with Q6_K for some ffn_down / attn_v


def test_gguf_loads_in_llama_cpp_and_in_transformers(q_settings, spm_root):
    import llama_cpp

    _, _, out = quantize(q_settings, "gemma3-spm", "Q8_0")
    [gguf_file] = out.glob("*.gguf")
    source_dir = spm_root / "gemma3-spm"
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    ids = tokenizer(PROMPT).input_ids
    reference = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, logits_all=True, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids
    llm.eval(ids)
    from_llama_cpp = np.array(llm.scores[: len(ids)])
    assert np.corrcoef(from_llama_cpp.ravel(), expected.ravel())[0, 1] > 0.999

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out, gguf_file=gguf_file.name)(PROMPT).input_ids == ids
    with torch.no_grad():
        from_transformers = loaded(torch.tensor([ids])).logits[0].numpy()
    assert np.corrcoef(from_transformers.ravel(), expected.ravel())[0, 1] > 0.999


def test_torchao_int8_directory_loads_and_generates(q_settings, spm_root):
    from torchao.quantization import Int8Tensor

    _, _, out = quantize(q_settings, "gemma3-spm", "int8", "torchao")
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    reference = AutoModelForCausalLM.from_pretrained(spm_root / "gemma3-spm")
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)(PROMPT).input_ids])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 0.05
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_every_quantize_problem_is_named(q_settings, tmp_path, monkeypatch):
    (tmp_path / "foreign").mkdir()
    monkeypatch.setenv("MERGER_TOOLS_DIR", str(tmp_path / "no-tools"))
    recipe = {"stages": [
        {"name": "from-adapter", "quantize": {"model": "gemma3-lora", "type": "int8", "format": "torchao"}},
        {"name": "bad-type", "quantize": {"model": "gemma3-spm", "type": "Q4_K_Z"}},
        {"name": "no-tools", "quantize": {"model": "gemma3-spm", "type": "Q8_0"}},
        {"name": "merged-gguf", "merge": {"merge_method": "linear", "models": [
            {"model": "no-tools", "parameters": {"weight": 0.5}}, {"model": "gemma3-spm", "parameters": {"weight": 0.5}}]}},
    ]}
    settings = Settings()
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, Store(settings), default_name="bad")
    problems = {p.loc: p.msg for p in caught.value.problems}
    assert "is an adapter" in problems["stages[0].quantize.model"]
    assert "'Q4_K_Z' is not a gguf type" in problems["stages[1].quantize"]
    assert "merger setup-gguf" in problems["stages[2].quantize.format"]
    assert "GGUF model" in problems["stages[3].merge.models[0].model"]
    assert len(problems) == 4


def test_architecture_without_a_converter_is_named(q_settings, spm_root, tmp_path):
    import json
    import shutil

    odd = spm_root / "odd-arch"
    if not odd.exists():
        shutil.copytree(spm_root / "llama-spm", odd)
        config = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchForCausalLM"]}))
    recipe = {"stages": [{"name": "q", "quantize": {"model": "odd-arch", "type": "Q8_0"}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.quantize\.model: architecture NoSuchForCausalLM has no GGUF converter"):
        check_recipe(recipe, q_settings, Store(q_settings), default_name="q")


def test_three_recipes_fold_merge_quantize_form_one_graph_and_rebuild(q_settings, spm_root):
    from merger import graph
    from merger.orchestrator import rebuild

    store = Store(q_settings)
    recipes = [
        {"stages": [{"name": "tuned", "adapters": {"base": "gemma3-spm", "mode": "fold", "adapters": [{"path": "gemma3-lora"}]}}]},
        {"stages": [{"name": "blend", "merge": {"merge_method": "linear", "models": [
            {"model": "tuned", "parameters": {"weight": 0.5}}, {"model": "gemma3-spm", "parameters": {"weight": 0.5}}]}}]},
        {"stages": [{"name": "blend-q4", "quantize": {"model": "blend", "type": "Q4_K_M"}}]},
    ]
    ids = [run_recipe(check_recipe(r, q_settings, store, default_name=f"r{i}"), q_settings, store)[0].model.id
           for i, r in enumerate(recipes)]
    tree = graph.ancestors(store, ids[-1])
    assert set(ids) <= set(tree.nodes)
    relations = {(store.get(e.parent).name, store.get(e.child).name, e.relation) for e in tree.edges}
    assert relations == {("gemma3-spm", "tuned", "adapter"), ("gemma3-lora", "tuned", "adapter"),
                         ("tuned", "blend", "merge"), ("gemma3-spm", "blend", "merge"), ("blend", "blend-q4", "quantized")}
    assert rebuild(store.get(ids[-1]), q_settings, store).identical
