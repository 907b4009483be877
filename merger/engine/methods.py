"""Merge methods as functions of tensors, computing exactly what mergekit 0.1.5 computes (same torch operations
in the same order and dtypes, so the results are bit-identical). Variants of task arithmetic are data; each
method's parameters and inputs are as ``merger.merge_methods`` declares them (mergekit's declarations)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merger.engine.sparsify import SPARSIFIERS
from merger.merge_methods import NATIVE_METHODS, BasePolicy, ParameterScope


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any = None  # None: required


@dataclass(frozen=True)
class Method:
    name: str
    # merge(tensors in mergekit's input order, index of the base or None, shared params, per-input params)
    merge: Callable[[list[torch.Tensor], int | None, dict, list[dict]], torch.Tensor]
    needs_base: bool
    shared: tuple[Param, ...] = ()
    per_input: tuple[Param, ...] = ()  # every input, the base too
    per_non_base: tuple[Param, ...] = ()
    exact_inputs: int | None = None
    randomized: bool = False
    elementwise: bool = False  # each output element depends on the same element of the inputs only

    def check_inputs(self, count: int, has_base: bool) -> None:
        from merger.engine.config import Unsupported

        if self.needs_base and not has_base:
            raise Unsupported(f"{self.name} without a base_model")
        if self.exact_inputs is not None and count != self.exact_inputs:
            raise Unsupported(f"{self.name} with {count} inputs")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors, base_index, shared, inputs) -> torch.Tensor:
    # mergekit packs one output as a batch of one: a leading axis of size 1, coefficients shaped [1, inputs]
    packed = [t.unsqueeze(0) for t in tensors]
    dtype = _compute_dtype(packed[0].dtype)
    weight = torch.tensor([[p["weight"] for p in inputs]], dtype=dtype).to(dtype)
    shape = (1,) + (1,) * (packed[0].ndim - 1)
    result = torch.zeros_like(packed[0], dtype=dtype)
    for tensor, coefficient in zip(packed, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(shape))
    if shared["normalize"]:
        result.div_(weight.sum(dim=1).reshape(shape))
    return result.to(packed[0].dtype)[0]


COMBINE_ELEMENTS = 4 * 1024 * 1024  # per step of task arithmetic's elementwise part
SLERP_CHUNK = 1024 * 1024  # mergekit's bound on full-precision scratch, in elements


def slerp(tensors, base_index, shared, inputs, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    v0, v1 = tensors[base_index], tensors[1 - base_index]
    dtype = _compute_dtype(v0.dtype)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([shared["t"]], dtype=dtype).reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    chunks = [slice(start, start + SLERP_CHUNK) for start in range(0, a.shape[1], SLERP_CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(x[:, c].to(dtype), dim=1, keepdim=True) for c in chunks]
        value = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(value > eps, value, 1)

    norm_a, norm_b = norm(a), norm(b)
    dots = [((a[:, c].to(dtype) / norm_a) * (b[:, c].to(dtype) / norm_b)).sum(dim=1, keepdim=True) for c in chunks]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear_ = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear_, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear_, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for c in chunks:
        result[:, c] = coef_a * a[:, c].to(dtype) + coef_b * b[:, c].to(dtype)
    return result.reshape(v0.shape)


@dataclass(frozen=True)
class TaskArithmetic:
    """mergekit's generalized task arithmetic: sparsify each task vector, weight, elect signs, sum."""

    sparsification: str | None
    consensus: bool
    extra: tuple[str, ...] = field(default=())  # per-input parameters the sparsification takes

    def __call__(self, tensors, base_index, shared, inputs) -> torch.Tensor:
        base = tensors[base_index]
        others = [(t, p) for i, (t, p) in enumerate(zip(tensors, inputs)) if i != base_index]
        if not others:
            return base
        deltas = base.new_empty((len(others), *base.shape))
        for row, (tensor, params) in enumerate(others):
            delta = tensor - base
            if self.sparsification:
                delta = SPARSIFIERS[self.sparsification](
                    delta, params["density"], shared["rescale"], **{name: params[name] for name in self.extra})
            deltas[row] = delta
            del delta
        weights = torch.tensor([p["weight"] for _, p in others], dtype=deltas.dtype).unsqueeze(-1)
        # the rest is elementwise (sums run over the models' axis): done on runs of elements to bound memory
        flat, result = deltas.reshape(len(others), -1), torch.empty_like(base)
        for part in range(0, base.numel(), COMBINE_ELEMENTS):
            span = slice(part, part + COMBINE_ELEMENTS)
            result.view(-1)[span] = self._combine(flat[:, span], base.reshape(-1)[span], weights, shared)
        return result

    def _combine(self, deltas: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, shared: dict) -> torch.Tensor:
        deltas.mul_(weights)
        if self.consensus:
            mask = _sign_consensus(deltas, torch.int8 if shared["int8_mask"] else base.dtype)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(base.dtype)

    def method(self, name: str) -> Method:
        return Method(name, self, **_declared(name), randomized=self.sparsification == "random", elementwise=self.sparsification is None)


def _sign_consensus(deltas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """TIES sign election by the sum of the task vectors (>= 0 elects +)."""
    sign = deltas.sign().to(dtype)
    majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return sign == majority


def _declared(name: str) -> dict[str, Any]:
    """A method's parameters by scope (a default of None: required) and its inputs, as declared for checking."""
    spec = NATIVE_METHODS[name]

    def params(scope: ParameterScope) -> tuple[Param, ...]:
        return tuple(Param(p.name, p.value_type, None if p.required else p.default) for p in spec.parameters if p.scope == scope)

    contract = spec.contract
    exact = contract.max_inputs if contract.max_inputs == contract.min_inputs else None
    return {"needs_base": contract.base == BasePolicy.REQUIRED, "exact_inputs": exact, "shared": params(ParameterScope.SHARED),
            "per_input": params(ParameterScope.INPUT), "per_non_base": params(ParameterScope.NON_BASE)}


METHODS: dict[str, Method] = {
    "linear": Method("linear", linear, **_declared("linear"), elementwise=True),
    "slerp": Method("slerp", slerp, **_declared("slerp")),
    **{name: variant.method(name) for name, variant in {
        "task_arithmetic": TaskArithmetic(None, False),
        "ties": TaskArithmetic("magnitude", True),
        "dare_ties": TaskArithmetic("random", True),
        "dare_linear": TaskArithmetic("random", False),
        "breadcrumbs": TaskArithmetic("magnitude_outliers", False, ("gamma",)),
        "breadcrumbs_ties": TaskArithmetic("magnitude_outliers", True, ("gamma",)),
    }.items()},
}
