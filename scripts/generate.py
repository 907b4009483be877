"""Greedy continuations of prompts by a model directory: `python scripts/generate.py DIR PROMPT...`."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, prompts = sys.argv[1], sys.argv[2:]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
for prompt in prompts:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"{prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
