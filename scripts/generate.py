"""Greedy continuations of prompts: `python scripts/generate.py DIR_OR_GGUF PROMPT...`.

A model directory runs in transformers; a .gguf file runs in llama.cpp (llama-cpp-python).
"""

import sys
from pathlib import Path

import merger  # noqa: F401  (offline Hub, and quiet about torchao's CUDA kernels on a CPU machine)

MAX_NEW_TOKENS = 24


def transformers_generate(model_dir: str, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def llama_cpp_generate(gguf_file: str, prompts: list[str]) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, n_ctx=512, verbose=False)
    try:
        return [llm(prompt, max_tokens=MAX_NEW_TOKENS, temperature=0)["choices"][0]["text"] for prompt in prompts]
    finally:
        llm.close()


model, prompts = sys.argv[1], sys.argv[2:]
generate = llama_cpp_generate if Path(model).suffix == ".gguf" else transformers_generate
for prompt, answer in zip(prompts, generate(model, prompts), strict=True):
    print(f"{prompt!r} -> {answer!r}")
