"""One coefficient per (adapter, LoRA module), as the only trainable parameters of a resident model.

Module surgery, done once: every base ``nn.Linear`` an adapter targets gets a frozen low-rank path per
adapter, ``y = W0 x + sum_a c[a, m] * scale_a * B_a (A_a x)``. Backward then never forms a weight-sized
gradient: only the coefficients ``c`` (adapters × modules) require one. Setting ``c`` to other values is
a new candidate merge, with no file written and nothing reloaded.
"""

from dataclasses import dataclass

import torch
from torch import nn

from merger.lora import LoadedAdapter


class MixedLinear(nn.Module):
    def __init__(self, base: nn.Linear, paths: list[tuple[int, torch.Tensor, torch.Tensor, float]], coefficients: nn.Parameter, column: int):
        super().__init__()
        self.base, self.coefficients, self.column = base, coefficients, column
        self.adapters = [a for a, _, _, _ in paths]
        self.scales = [s for _, _, _, s in paths]
        self.a = nn.ParameterList([nn.Parameter(a_weight, requires_grad=False) for _, a_weight, _, _ in paths])
        self.b = nn.ParameterList([nn.Parameter(b_weight, requires_grad=False) for _, _, b_weight, _ in paths])

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``module.weight`` (dtype, device) expects
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter, scale, a, b in zip(self.adapters, self.scales, self.a, self.b, strict=True):
            y = y + (self.coefficients[adapter, self.column] * scale) * nn.functional.linear(nn.functional.linear(x, a), b)
        return y


@dataclass
class LoraMixture:
    """A model with every adapter's LoRA modules attached, weighted by ``coefficients[adapter, module]``."""

    model: nn.Module
    modules: list[str]  # base weight names, e.g. model.layers.0.self_attn.q_proj.weight (column order)
    targets: list[set[str]]  # per adapter: the weight names it has a LoRA module for
    coefficients: nn.Parameter

    @classmethod
    def attach(cls, model: nn.Module, adapters: list[LoadedAdapter], start: list[float]) -> "LoraMixture":
        """Freeze ``model`` (float32) and attach ``adapters``, each starting at its weight in ``start``."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        modules = sorted({name for adapter in adapters for name in adapter.modules})
        targets = [set(adapter.modules) for adapter in adapters]
        coefficients = nn.Parameter(torch.tensor(start, dtype=torch.float32)[:, None].repeat(1, len(modules)))
        for column, weight_name in enumerate(modules):
            module_name = weight_name.removesuffix(".weight")
            base = model.get_submodule(module_name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{module_name} is a {type(base).__name__}; LoRA coefficients are learned on Linear modules only")
            paths = []
            for index, adapter in enumerate(adapters):
                lora = adapter.modules.get(weight_name)
                if lora is None:
                    continue
                if adapter.config.get("fan_in_fan_out"):
                    raise ValueError(f"{adapter.path}: fan_in_fan_out adapters are not supported")
                a, b = adapter.tensors[lora.a_key].float(), adapter.tensors[lora.b_key].float()
                paths.append((index, a, b, lora.scale))
            parent_name, _, child = module_name.rpartition(".")
            model.get_submodule(parent_name).register_module(child, MixedLinear(base, paths, coefficients, column))
        return cls(model, modules, targets, coefficients)

    def set(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.coefficients.copy_(values)

    def uniform(self, weights: list[float]) -> torch.Tensor:
        """Coefficients with every module of adapter ``a`` at ``weights[a]``."""
        return torch.tensor(weights, dtype=torch.float32)[:, None].repeat(1, len(self.modules))

    def per_adapter(self, values: torch.Tensor | None = None) -> list[dict[str, float]]:
        """For each adapter, its coefficient for each weight it targets (untargeted columns are unused)."""
        values = self.coefficients.detach() if values is None else values
        return [{name: float(values[a, m]) for m, name in enumerate(self.modules) if name in self.targets[a]}
                for a in range(len(self.targets))]
