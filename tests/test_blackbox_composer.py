"""The black-box searcher's composer holds one input at a time and keeps, of the others, what differs."""

import json
import weakref
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merger.lora import LoadedAdapter, fold
from merger.search.blackbox import load_composer
from merger.stages.search_blackbox import _InputTensors, _start
from tests.test_search import one_thread, search_inputs  # noqa: F401 - fixtures (one_thread: autouse, one torch thread)


def test_inputs_are_read_one_at_a_time_and_only_differing_tensors_are_kept(search_inputs):
    dirs = [search_inputs / "llama-base", search_inputs / "search-llama-lora-a", search_inputs / "search-llama-lora-b"]
    slots = [SimpleNamespace(model_input=0, adapter_input=None)] + [SimpleNamespace(model_input=0, adapter_input=i) for i in (1, 2)]
    held = []

    def loader(slot):
        def load():
            assert all(earlier() is None for earlier in held), "an earlier input is still held"
            tensors = _InputTensors(dirs, slot)
            held.append(weakref.ref(tensors))
            return tensors
        return load

    model = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32)
    merge = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
                                                                    {"model": "c", "parameters": {"weight": 1.0, "density": 0.5}}]}
    composer = load_composer(model, "ties", 0, [loader(s) for s in slots], _start(merge, 2), (4, 1, []))

    base = {name: t.float() for name, t in load_file(dirs[0] / "model.safetensors").items()}
    adapters = [LoadedAdapter.load(d, json.loads((d / "adapter_config.json").read_text())) for d in dirs[1:]]
    folded = [{name: fold(t, name, [(adapter, 1.0)], torch.float32) for name, t in base.items()} for adapter in adapters]
    differing = sorted(n for n in base if any(not torch.equal(base[n], x[n]) for x in folded))
    assert composer.names == differing
    assert {n.split(".")[-2] for n in differing} == {"q_proj", "v_proj", "down_proj", "up_proj"}  # both adapters' targets
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in base.items())
    for n in differing:
        assert torch.equal(composer.base[n], base[n])
        for x, vectors in zip(folded, composer.inputs, strict=True):
            assert torch.equal(vectors[n], x[n] - base[n])
