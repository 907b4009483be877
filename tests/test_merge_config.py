"""merger checks merge configs without importing mergekit: its restatement of mergekit's config model
(``merger.merge_config``) and of the engine's methods' declarations (``merger.merge_methods``) must agree with
mergekit's own, or recipes would be checked against something mergekit does not run."""

import pytest
from mergekit import config as theirs
from mergekit.common import ModelReference as TheirReference
from mergekit.merge_methods.base import MISSING as THEIR_MISSING
from mergekit.merge_methods.registry import registered_methods
from pydantic import ValidationError

from merger import merge_config as ours
from merger.merge_methods import MERGEKIT_METHODS, MISSING, NATIVE_METHODS, method_spec

THEIR_METHODS = {m.spec.name: m.spec for m in registered_methods()}


def _without_descriptions(schema):
    if isinstance(schema, dict):
        return {k: _without_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_without_descriptions(v) for v in schema]
    return schema


def test_the_config_schema_is_mergekits():
    assert _without_descriptions(ours.MergeConfiguration.model_json_schema()) == \
        _without_descriptions(theirs.MergeConfiguration.model_json_schema())


def _outcome(model, raw):
    """What validating ``raw`` gives: the config (as mergekit reads its dump back: how a merge reaches mergekit),
    pydantic's errors, or the exception a validator raises."""
    try:
        return "ok", theirs.MergeConfiguration.model_validate(model.model_validate(raw).model_dump())
    except ValidationError as exc:
        return "invalid", [(e["loc"], e["msg"], e["type"]) for e in exc.errors()]
    except (RuntimeError, ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


CONFIGS = [
    {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b@rev+lora@v2"}]},
    {"merge_method": "ties", "base_model": "a", "models": [{"model": "b", "parameters": {"weight": [0, 1], "density": {"filter": "mlp", "value": 0.5}}}],
     "parameters": {"lambda": [{"filter": "attn", "value": [1, 2]}, {"value": "1e-3"}]}, "dtype": "bfloat16", "out_dtype": "float16"},
    {"merge_method": "slerp", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}],
                                          "base_model": "a", "residual_weight": 0.1, "parameters": {"t": 0.5}}]},
    {"merge_method": "linear", "modules": {"m": {"models": [{"model": "a"}]}, "n": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "base", "pad_to_multiple_of": 8, "tokens": {
        "<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 3}}, "<y>": {"source": {"kind": "zero"}, "force": True},
        "<z>": {"source": "a"}}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union", "chat_template": "chatml"},
    {"merge_method": "linear", "models": [{"model": {"model": {"path": "a", "revision": "r"}, "override_architecture": "X"}}]},
    # refused
    {"merge_method": "linear"},
    {"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": []}]},
    {"merge_method": 3, "models": "a"},
    {"models": [{"model": "a+b+c"}], "merge_method": "linear"},
    {"models": [{"model": "a@1@2"}], "merge_method": "linear"},
    {"merge_method": "linear", "models": [{"model": ["a"], "parameters": {"weight": {"filter": 1}}}], "dtype": 2},
    {"merge_method": "linear", "models": [{"model": "a", "parameters": {"w": [[1]], "v": None, "u": {"value": {"value": 1}}}}]},
    {"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, "x", 2]}], "residual_weight": "heavy"}]},
    {"merge_method": "linear", "modules": {"m": {"parameters": {}}}},
    {"merge_method": "linear", "modules": {"m": {"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "b", "tokenizer": {"source": "union"}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": 5, "tokens": {"<x>": {"source": {"kind": "model_token", "model": "a"}}}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 1, "token": "t"}}}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"tokens": {"<x>": {"source": {"kind": "other"}, "force": "maybe"}}}},
    {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": ["a"], "chat_template": 1, "parameters": [1]},
]


@pytest.mark.parametrize("raw", CONFIGS)
def test_a_config_validates_or_fails_as_in_mergekit(raw):
    assert _outcome(ours.MergeConfiguration, raw) == _outcome(theirs.MergeConfiguration, raw)


@pytest.mark.parametrize("text", ["a", "org/a@main", "a+b", "a@1+b@2", "a+", "a@"])
def test_a_reference_reads_and_prints_as_in_mergekit(text):
    def read(reference):
        paths = (reference.model, reference.lora)
        return str(reference), [(p.path, p.revision) if p else None for p in paths]

    assert read(ours.ModelReference.model_validate(text)) == read(TheirReference.model_validate(text))


def test_the_method_names_are_mergekits():
    assert MERGEKIT_METHODS == tuple(THEIR_METHODS)


@pytest.mark.parametrize("name", NATIVE_METHODS)
def test_the_engines_methods_are_declared_as_in_mergekit(name):
    mine, their = NATIVE_METHODS[name], THEIR_METHODS[name]
    assert mine.name == their.name
    assert [(p.name, p.value_type, p.scope.value, p.default if p.default is not MISSING else None, p.required) for p in mine.parameters] == \
        [(p.name, p.value_type, p.scope.value, p.default if p.default is not THEIR_MISSING else None, p.required) for p in their.parameters]
    contract = their.contract
    assert (mine.contract.base.value, mine.contract.min_inputs, mine.contract.max_inputs) == \
        (contract.base.value, contract.min_inputs, contract.max_inputs)
    assert contract.min_non_base is None and contract.max_non_base is None  # merger's contract has no such bounds


@pytest.mark.parametrize("name", NATIVE_METHODS)
@pytest.mark.parametrize("inputs, base", [(["a"], None), (["a"], "a"), (["a", "b"], "a"), (["a", "b", "c"], "a"), (["a", "b"], "c"),
                                          (["a", "a"], "a"), ([], None), (["a", "b", "c"], None)])
def test_a_contract_refuses_inputs_as_in_mergekit(name, inputs, base):
    def refusal(contract):
        try:
            contract.validate_ids(inputs, base)
        except ValueError as exc:
            return str(exc)
        return None

    assert refusal(NATIVE_METHODS[name].contract) == refusal(THEIR_METHODS[name].contract)


def test_other_methods_are_read_from_mergekit():
    assert method_spec("nuslerp") is THEIR_METHODS["nuslerp"]
