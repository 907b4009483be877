"""Merge methods, computing exactly what mergekit 0.1.5 computes (the same torch operations in the same order and
dtypes; TIES's combining step on bfloat16 in one compiled loop that rounds where they round), so the results are
bit-identical. Each runs on one output tensor, reading runs of its inputs in as many passes as it needs.
Variants of task arithmetic are data; each method's parameters and inputs are as ``merger.merge_methods``
declares them (mergekit's declarations)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merger.engine.sparsify import SPARSIFIERS, Sparsifier
from merger.engine.stream import Inputs, Output, scratch
from merger.merge_methods import NATIVE_METHODS, BasePolicy, ParameterScope

# run(inputs, output, index of the base or None, shared params, per-input params in mergekit's input order)
Run = Callable[[Inputs, Output, int | None, dict, list[dict]], None]


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any = None  # None: required


@dataclass(frozen=True)
class Method:
    name: str
    run: Run
    needs_base: bool
    shared: tuple[Param, ...] = ()
    per_input: tuple[Param, ...] = ()  # every input, the base too
    per_non_base: tuple[Param, ...] = ()
    exact_inputs: int | None = None
    randomized: bool = False
    tensors_at_once: bool = False  # its tensors may be merged concurrently, on single-threaded torch (see run.execute)
    elementwise: bool = False  # its result's bits do not depend on torch's thread count (see run._torch_thread_count)
    # glibc's mmap threshold while it runs (see run._large_allocations_unmapped): slerp's passes over runs of several
    # sizes grew glibc's heap by a gigabyte unless every block of 1 MB or more was mapped afresh; task arithmetic's
    # blocks come in a few sizes per tensor, and mapping each afresh cost seconds of page faults
    mmap_threshold: int = 1 << 20

    def check_inputs(self, count: int, has_base: bool) -> None:
        from merger.engine.config import Unsupported

        if self.needs_base and not has_base:
            raise Unsupported(f"{self.name} without a base_model")
        if self.exact_inputs is not None and count != self.exact_inputs:
            raise Unsupported(f"{self.name} with {count} inputs")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


LINEAR_RUN_ELEMENTS = 1024 * 1024  # per run of linear's sum (its float32 buffers, 4 MB each, stay in cache)


def linear(inputs: Inputs, out: Output, base_index, shared, params) -> None:
    """mergekit's linear: a float32 sum (float64 for float64 inputs) from +0.0, one ``addcmul_`` of each input by its
    weight in model order (a fused multiply-add), divided by the weights' sum with ``normalize``, rounded to the
    inputs' dtype. A run of elements at a time, in reused buffers: each input is widened there first, as torch's
    ``addcmul_`` widens a bfloat16 operand before its float32 kernel runs (the same bits, without a fresh
    temporary's page faults per run)."""
    dtype = _compute_dtype(inputs.dtype)
    weight = torch.tensor([[p["weight"] for p in params]], dtype=dtype)  # mergekit's shape: a batch of one
    coefficients, divisor = weight[0].unbind(0), weight.sum(dim=1)
    zero = torch.zeros(1, dtype=dtype)  # the sum's start, broadcast: the first addcmul writes the sum (no pass to zero it)
    for span in inputs.spans(LINEAR_RUN_ELEMENTS):
        count = span.stop - span.start
        total = scratch("linear-sum", count, dtype)
        for i, coefficient in enumerate(coefficients):
            run = inputs.read(i, span).reshape(-1)
            widened = run if run.dtype == dtype else scratch("linear-input", count, dtype).copy_(run)
            torch.addcmul(zero if i == 0 else total, widened, coefficient, out=total)
        if shared["normalize"]:
            total.div_(divisor)
        out.write(total if inputs.dtype == dtype else scratch("linear-out", count, inputs.dtype).copy_(total), span.start)


SLERP_CHUNK = 1024 * 1024  # mergekit's bound on full-precision scratch, in elements


def slerp(inputs: Inputs, out: Output, base_index, shared, params, dot_threshold: float = 0.9995, eps: float = 1e-8) -> None:
    """mergekit's slerp of the flattened tensors: its norms and dot product are sums over runs of SLERP_CHUNK
    elements, made here in three passes over the inputs (norms, dot, result), each a run of chunks at a time; a
    tensor of one run is read once. The same torch operations as mergekit's, on each thread's reused buffers
    (fresh temporaries cost their pages' faults on every chunk)."""
    first, second = base_index, 1 - base_index
    dtype = _compute_dtype(inputs.dtype)
    t = torch.tensor([shared["t"]], dtype=dtype).reshape(-1, 1).to(dtype)
    if not inputs.numel:
        a, b = inputs.read(first).reshape(1, -1), inputs.read(second).reshape(1, -1)
        out.write(((1 - t) * a + t * b).reshape(inputs.shape).to(inputs.dtype))
        return
    spans = inputs.spans(multiple=SLERP_CHUNK)

    def read(span: slice) -> tuple[slice, torch.Tensor, torch.Tensor]:
        return span, inputs.read(first, span).reshape(1, -1), inputs.read(second, span).reshape(1, -1)

    held = [read(spans[0])] if len(spans) == 1 else None

    def pairs():
        return iter(held) if held else map(read, spans)

    def chunks(span: slice) -> list[slice]:
        return [slice(start, start + SLERP_CHUNK) for start in range(0, span.stop - span.start, SLERP_CHUNK)]

    def widened(run: torch.Tensor, name: str) -> torch.Tensor:
        """``run.to(dtype)``, in a reused buffer."""
        return scratch(name, run.numel(), dtype).view(run.shape).copy_(run)

    parts_a, parts_b = [], []
    for span, a, b in pairs():
        for c in chunks(span):
            parts_a.append(torch.linalg.vector_norm(widened(a[:, c], "slerp-a"), dim=1, keepdim=True))
            parts_b.append(torch.linalg.vector_norm(widened(b[:, c], "slerp-b"), dim=1, keepdim=True))

    def norm(parts: list[torch.Tensor]) -> torch.Tensor:
        value = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(value > eps, value, 1)

    norm_a, norm_b = norm(parts_a), norm(parts_b)

    def products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (a / norm_a) * (b / norm_b)
        return widened(a, "slerp-a").div_(norm_a).mul_(widened(b, "slerp-b").div_(norm_b))

    dots = [products(a[:, c], b[:, c]).sum(dim=1, keepdim=True) for span, a, b in pairs() for c in chunks(span)]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear_ = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear_, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear_, t, torch.sin(t * theta) / sin_theta)

    for span, a, b in pairs():
        result = scratch("slerp-result", span.stop - span.start, inputs.dtype)
        for c in chunks(span):  # coef_a * a + coef_b * b, rounded to the inputs' dtype
            result[c] = widened(a[:, c], "slerp-a").mul_(coef_a).add_(widened(b[:, c], "slerp-b").mul_(coef_b))[0]
        out.write(result, span.start)


@dataclass(frozen=True)
class TaskArithmetic:
    """mergekit's generalized task arithmetic: sparsify each task vector, weight, elect signs, sum."""

    sparsification: str | None
    consensus: bool
    extra: tuple[str, ...] = field(default=())  # per-input parameters the sparsification takes

    def __call__(self, inputs: Inputs, out: Output, base_index, shared, params) -> None:
        others = [i for i in range(len(inputs.stored)) if i != base_index]
        if not others:
            for span in inputs.spans():
                out.write(inputs.read(base_index, span), span.start)
            return
        weights = torch.tensor([params[i]["weight"] for i in others], dtype=inputs.dtype).unsqueeze(-1)
        sparsify = SPARSIFIERS[self.sparsification] if self.sparsification else None
        # where every task vector is +0.0 (the tensor unchanged by every input), so is each one sparsified: every
        # element's sum is the same signed zero (or NaN, for infinite weights), computed once
        zero = self._mixed(torch.zeros((len(others), 1), dtype=inputs.dtype, device=inputs.device), weights, shared)
        if inputs.unchanged(base_index, lambda span, base: out.write((base + zero).to(inputs.dtype), span.start)):
            for i in others if sparsify else ():  # DARE's draws are still made, so later tensors get theirs
                sparsify.skip(inputs.numel, inputs.dtype, inputs.device, params[i]["density"], inputs.draws)
        elif sparsify is None or sparsify.streams(inputs.device):
            self._streamed(inputs, out, base_index, others, params, weights, shared, sparsify)
        else:
            self._whole(inputs, out, base_index, others, params, weights, shared, sparsify)

    def _streamed(self, inputs, out, base_index, others, params, weights, shared, sparsify: Sparsifier | None) -> None:
        """Passes over each task vector decide its selection (a mask, or how to draw it again, and a rescaling
        factor), in mergekit's order of models; then one pass over runs of elements computes and combines."""
        selections = [sparsify.select(lambda i=i: _task_vector(inputs, base_index, i), inputs.numel, inputs.dtype, inputs.device,
                                      params[i]["density"], shared["rescale"], **{name: params[i][name] for name in self.extra},
                                      stream=inputs.draws)
                      if sparsify else None for i in others]
        for span in inputs.spans():
            base = inputs.read(base_index, span)
            deltas = base.new_empty((len(others), span.stop - span.start))
            for row, (i, selection) in enumerate(zip(others, selections)):
                delta = inputs.read(i, span) - base
                deltas[row] = selection.apply(delta, span) if selection else delta
            out.write(self._combine(deltas, base, weights, shared), span.start)

    def _whole(self, inputs, out, base_index, others, params, weights, shared, sparsify: Sparsifier) -> None:
        """Where ``select`` does not reproduce a sparsifier (DARE off the CPU): each task vector sparsified whole."""
        base = inputs.read(base_index)
        deltas = base.new_empty((len(others), *base.shape))
        for row, i in enumerate(others):
            delta = sparsify.whole(inputs.read(i) - base, params[i]["density"], shared["rescale"],
                             **{name: params[i][name] for name in self.extra})
            deltas[row] = delta
            del delta
        flat, base = deltas.reshape(len(others), -1), base.reshape(-1)
        for span in inputs.spans():
            out.write(self._combine(flat[:, span], base[span], weights, shared), span.start)

    def _combine(self, deltas: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, shared: dict) -> torch.Tensor:
        if self.consensus and len(deltas) == 2 and base.dtype == torch.bfloat16 and base.device.type == "cpu" and shared["lambda"] == 1:
            from merger.engine.bf16 import ties_combine  # numba compiles (or loads its cache) on first use

            if (fused := ties_combine(deltas, base, weights, shared["normalize"])) is not None:
                return fused
        return (base + self._mixed(deltas, weights, shared)).to(base.dtype)

    def _mixed(self, deltas: torch.Tensor, weights: torch.Tensor, shared: dict) -> torch.Tensor:
        deltas.mul_(weights)
        if self.consensus:
            mask = _sign_consensus(deltas, torch.int8 if shared["int8_mask"] else deltas.dtype)
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
        return mixed

    def method(self, name: str) -> Method:
        return Method(name, self, **_declared(name), randomized=self.sparsification == "random", tensors_at_once=True,
                      mmap_threshold=32 << 20)


def _task_vector(inputs: Inputs, base_index: int, i: int):
    """Input i's task vector (input - base), run by run: (span, run)."""
    for span in inputs.spans():
        yield span, inputs.read(i, span) - inputs.read(base_index, span)


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
