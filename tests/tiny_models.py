"""Tiny random models (Gemma 3 text and Llama) saved as Hugging Face safetensors directories."""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast

VOCAB = 64


def tiny_config(arch: str, **sizes):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128) | sizes
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=32, dtype="bfloat16",
                                architectures=["Gemma3ForCausalLM"])
    if arch == "llama":
        return LlamaConfig(**common, dtype="bfloat16", architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    raise ValueError(arch)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


# big enough that a TIES merge takes seconds, so tests can cancel or kill a worker mid-merge
SLOW_SIZES = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4)


def make_family(root: Path, arch: str, n_finetunes: int = 2, seed: int = 0, prefix: str | None = None, **sizes) -> list[Path]:
    """A base model and ``n_finetunes`` perturbed copies of it, in bf16: [base, ft1, ft2, ...]."""
    torch.manual_seed(seed)
    prefix = prefix or arch
    base = AutoModelForCausalLM.from_config(tiny_config(arch, **sizes), dtype=torch.bfloat16)
    paths = [save_model(base, root / f"{prefix}-base")]
    for i in range(1, n_finetunes + 1):
        tuned = AutoModelForCausalLM.from_config(tiny_config(arch, **sizes), dtype=torch.bfloat16)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths.append(save_model(tuned, root / f"{prefix}-ft{i}"))
    return paths


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def make_lora(base_dir: Path, out: Path, *, seed: int, r: int = 4, alpha: int = 8,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), **config) -> Path:
    """A random PEFT LoRA adapter for the model in ``base_dir`` (B is random too, so it changes the model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    return out
