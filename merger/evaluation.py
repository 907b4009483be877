"""Task accuracy of a causal LM on `{"prompt", "answer"}` JSONL files.

An example is right when the greedy continuation of the prompt (tokenized with the model's own
tokenizer, special tokens as it adds them), decoded for as many tokens as the answer has plus one,
starts with the answer exactly.
"""

import json
from pathlib import Path

import torch


def load_examples(path: Path, limit: int | None = None) -> list[dict]:
    examples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return examples[:limit] if limit else examples


@torch.inference_mode()
def task_accuracy(model, tokenizer, examples: list[dict]) -> float:
    right = 0
    for example in examples:
        ids = tokenizer(example["prompt"], return_tensors="pt").input_ids
        budget = len(tokenizer(example["answer"], add_special_tokens=False).input_ids) + 1
        out = model.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith(example["answer"])
    return right / len(examples)
