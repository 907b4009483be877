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
        return Gemma3TextConfig(**({"head_dim": 16} | common), sliding_window=32, dtype="bfloat16",
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


# Rows of 256 let llama.cpp use its K-quants (super-blocks of 256); a SentencePiece tokenizer.model is what
# llama.cpp's converter reads for Gemma and Llama vocabularies.
GGUF_SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
SPECIAL_TOKENS = {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>")}
WORDS = "the quick brown fox jumps over a lazy dog review positive negative name age city json text".split()


def train_sentencepiece(path: Path, vocab_size: int = 320) -> Path:
    """A small BPE SentencePiece model with byte fallback (pad 0, eos 1, bos 2, unk 3: Gemma's ids and names)."""
    import sentencepiece as spm

    sentences = (" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(400))
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=(writer := _BytesWriter()), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   **{f"{name}_{key}": value for name, (i, piece) in SPECIAL_TOKENS.items()
                                      for key, value in (("id", i), ("piece", piece))})
    path.write_bytes(writer.data)
    return path


class _BytesWriter:
    data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk


def make_sentencepiece_model(root: Path, arch: str, seed: int = 0) -> Path:
    """A tiny bf16 model whose directory llama.cpp's converter accepts: ``{arch}-spm``."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    out = root / f"{arch}-spm"
    out.mkdir(parents=True)
    train_sentencepiece(out / "tokenizer.model")
    tokenizer_class = GemmaTokenizer if arch == "gemma3" else LlamaTokenizer
    special = {f"{name}_token": piece for name, (_, piece) in SPECIAL_TOKENS.items()}
    tokenizer_class.from_pretrained(out, add_bos_token=True, **special).save_pretrained(out)
    # Gemma 3: head_dim = query_pre_attn_scalar (256), as in Gemma 3 270M; llama.cpp scales attention by
    # head_dim^-0.5 and a GGUF has no key for the scalar, so other values would load differently
    config = tiny_config(arch, vocab_size=320, **GGUF_SIZES, **({"head_dim": 256} if arch == "gemma3" else {}))
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out
