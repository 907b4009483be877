"""LoRA adapters as tensors: reading PEFT adapter files and folding their updates into base weights.

Pure tensor math. A LoRA module adds ``scale * B @ A`` to the base weight of the module it targets,
with ``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA) and per-module overrides from
``rank_pattern`` / ``alpha_pattern``. Updates are accumulated in float32 and cast once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: checking an adapter's config needs none
    import torch

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


@dataclass(frozen=True)
class LoraModule:
    module: str  # the base module, e.g. model.layers.0.self_attn.q_proj (its weight: module + ".weight")
    a_key: str
    b_key: str
    rank: int
    scale: float


def unsupported(config: dict) -> list[str]:
    """What an adapter uses that folding as plain LoRA would get wrong."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            problems.append(f"uses {what}, which merger does not support yet")
    if config.get("modules_to_save"):
        problems.append(f"trains whole modules ({', '.join(config['modules_to_save'])}), which merger does not support yet")
    if config.get("layer_replication"):
        problems.append("uses layer_replication, which merger does not support")
    return problems


def modules(config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[list[LoraModule], list[str]]:
    """The adapter's LoRA modules from its config and tensor names/shapes, and the tensors it can't use."""
    pairs: dict[str, dict[str, str]] = {}
    leftovers = []
    for key in shapes:
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            leftovers.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["part"]] = key
    result = []
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            leftovers.extend(parts.values())
            continue
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        result.append(LoraModule(module, parts["A"], parts["B"], shapes[parts["A"]][0], scale))
    return result, leftovers


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name ending in it (at a dot boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def delta(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """A LoRA module's update to its base weight, in float32."""
    update = (b.float() @ a.float()) * scale
    return update.T if fan_in_fan_out else update


@dataclass
class LoadedAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]  # by base weight name (module + ".weight")
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: Path, config: dict) -> LoadedAdapter:
        from safetensors.torch import load_file

        tensors = load_file(path / "adapter_model.safetensors")
        found, _ = modules(config, {k: tuple(v.shape) for k, v in tensors.items()})
        return cls(path, config, {m.module + ".weight": m for m in found}, tensors)

    def update_for(self, weight_name: str) -> torch.Tensor | None:
        module = self.modules.get(weight_name)
        if module is None:
            return None
        return delta(self.tensors[module.a_key], self.tensors[module.b_key], module.scale, bool(self.config.get("fan_in_fan_out")))


def fold(weight: torch.Tensor, name: str, adapters: list[tuple[LoadedAdapter, float]], dtype: torch.dtype) -> torch.Tensor:
    """``weight`` plus every adapter's weighted update for it, added in order in float32, cast once."""
    updates = [(u, w) for adapter, w in adapters if (u := adapter.update_for(name)) is not None]
    if not updates:
        return weight.to(dtype)
    import torch

    total = weight.to(torch.float32, copy=True)
    for update, w in updates:
        total += w * update
    return total.to(dtype)
