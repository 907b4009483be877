"""What checking a merge config needs of a merge method (its parameters and input contract), without importing
mergekit, whose method registry imports torch: the methods merger's engine runs are declared here as mergekit 0.1.5
declares them; any other method's declaration is read from mergekit's registry. ``tests/test_merge_config.py``
compares these with mergekit's."""

from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Any, Hashable, Sequence

if TYPE_CHECKING:
    from pydantic import TypeAdapter

# every method mergekit 0.1.5 registers, in its order
MERGEKIT_METHODS = (
    "multislerp", "nearswap", "ram", "ramplus_tl", "sce", "linear", "slerp", "nuslerp", "passthrough", "model_stock",
    "arcee_fusion", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear",
)


class ParameterScope(str, Enum):
    SHARED = "shared"  # one value for all inputs
    INPUT = "input"  # a value per input
    NON_BASE = "non_base"  # a value per input but the base


class BasePolicy(str, Enum):
    IGNORED = "ignored"
    REQUIRED = "required"


MISSING = object()  # a parameter without a default is required


@cache
def _adapter(value_type: type) -> "TypeAdapter":
    from pydantic import TypeAdapter  # not on the merge engine's path: importing pydantic took 0.15 s

    return TypeAdapter(value_type)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    value_type: type
    scope: ParameterScope
    default: Any = MISSING

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def validate(self, value: Any) -> Any:
        """The value as mergekit reads it (pydantic's lax conversion to the parameter's type), or ValidationError."""
        return _adapter(self.value_type).validate_python(value)


@dataclass(frozen=True)
class InputContract:
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None

    def validate_ids(self, inputs: Sequence[Hashable], base: Hashable | None = None) -> None:
        """Raise ValueError, with mergekit's message, when a group of inputs breaks the contract."""
        if len(set(inputs)) != len(inputs):
            raise ValueError("Duplicate merge inputs")
        if self.base == BasePolicy.IGNORED:
            base = None
        if base is not None and base not in inputs:
            raise ValueError("Base input is not present in merge inputs")
        if self.base == BasePolicy.REQUIRED and base is None:
            raise ValueError("Merge method requires a base input")
        count = len(inputs)
        if count < self.min_inputs:
            raise ValueError(f"Merge method requires at least {self.min_inputs} inputs; got {count}")
        if self.max_inputs is not None and count > self.max_inputs:
            bound = f"exactly {self.min_inputs}" if self.min_inputs == self.max_inputs else f"at most {self.max_inputs}"
            raise ValueError(f"Merge method requires {bound} inputs; got {count}")


@dataclass(frozen=True)
class MergeMethodSpec:
    name: str
    parameters: tuple[ParameterSpec, ...]
    contract: InputContract = InputContract()


def _task_arithmetic(name: str, normalize: bool, rescale: bool, *extra: ParameterSpec) -> MergeMethodSpec:
    shared, non_base = ParameterScope.SHARED, ParameterScope.NON_BASE
    return MergeMethodSpec(name, (
        ParameterSpec("int8_mask", bool, shared, False), ParameterSpec("normalize", bool, shared, normalize),
        ParameterSpec("rescale", bool, shared, rescale), ParameterSpec("lambda", float, shared, 1.0),
        ParameterSpec("weight", float, non_base), ParameterSpec("density", float, non_base, 1.0), *extra,
    ), InputContract(BasePolicy.REQUIRED))


_GAMMA = ParameterSpec("gamma", float, ParameterScope.NON_BASE, 0.01)
NATIVE_METHODS: dict[str, MergeMethodSpec] = {
    "linear": MergeMethodSpec("linear", (ParameterSpec("weight", float, ParameterScope.INPUT),
                                         ParameterSpec("normalize", bool, ParameterScope.SHARED, True))),
    "slerp": MergeMethodSpec("slerp", (ParameterSpec("t", float, ParameterScope.SHARED),), InputContract(BasePolicy.REQUIRED, 2, 2)),
    "task_arithmetic": _task_arithmetic("task_arithmetic", False, False),
    "ties": _task_arithmetic("ties", True, False),
    "dare_ties": _task_arithmetic("dare_ties", False, True),
    "dare_linear": _task_arithmetic("dare_linear", False, True),
    "breadcrumbs": _task_arithmetic("breadcrumbs", False, False, _GAMMA),
    "breadcrumbs_ties": _task_arithmetic("breadcrumbs_ties", False, False, _GAMMA),
}


def method_spec(name: str) -> MergeMethodSpec:
    """The declaration of one of ``MERGEKIT_METHODS``: merger's own for the engine's methods, else mergekit's."""
    if name in NATIVE_METHODS:
        return NATIVE_METHODS[name]
    from mergekit.merge_methods import registry

    return registry.get(name).spec
