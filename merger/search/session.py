"""A search's resident state: the base model loaded once (float32), the adapters attached, the data split
and tokenized (and a general text cut into training chunks); and the honest checks, greedy generation on the
held-back test lines and perplexity on the general text's measured windows."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merger.evaluation.datasets import DataError, Generation, read_text
from merger.evaluation.metrics import generation_accuracy
from merger.evaluation.runtimes import HFModel
from merger.lora import LoadedAdapter
from merger.search.general import GeneralText
from merger.search.lora_mix import LoraMixture
from merger.search.scoring import Encoded, encode
from merger.search.split import TaskSplit, split_task


@dataclass
class Session:
    mixture: LoraMixture
    tokenizer: object
    splits: list[TaskSplit]
    train: list[list[Encoded]]  # per task
    choose: list[Encoded]  # every task's choosing lines
    general: GeneralText | None = None
    general_chunks: list[list[int]] = field(default_factory=list)  # what the search may train on

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def lm(self, values: torch.Tensor) -> HFModel:
        """The resident model with ``values`` as coefficients, as the evaluation runtimes wrap a model."""
        self.mixture.set(values)
        return HFModel("transformers", self.mixture.model, self.tokenizer)

    def general_perplexity(self, values: torch.Tensor) -> float | None:
        return self.general.perplexity(self.lm(values)) if self.general else None

    def test_accuracy(self, values: torch.Tensor) -> list[float]:
        """Greedy accuracy on each task's test lines (the fixtures' definition), with ``values`` as coefficients."""
        self.mixture.set(values)
        return greedy_test_accuracy(self.mixture.model, self.tokenizer, self.splits)


def greedy_test_accuracy(model, tokenizer, splits: list[TaskSplit]) -> list[float]:
    """Greedy accuracy of a resident model on each task's test lines."""
    lm = HFModel("transformers", model, tokenizer)
    out = []
    for split in splits:
        examples: list[Generation] = [line.example for line in split.test]
        out.append(generation_accuracy(lm, examples, step=lambda *_: None).values["accuracy"] if examples else float("nan"))
    return out


def open_session(base_dir: Path, adapter_dirs: list[Path], tasks: list[tuple[Path, str]], test_lines: frozenset[int],
                 start: list[float], *, choose_fraction: float = 0.25, seed: int = 0,
                 general: tuple[Path, str] | None = None, general_tokens: int = 0) -> Session:
    """``general``: a text file and its label; with ``general_tokens`` > 0 it is also cut into training chunks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    adapters = [LoadedAdapter.load(d, json.loads((d / "adapter_config.json").read_text())) for d in adapter_dirs]
    mixture = LoraMixture.attach(model.eval(), adapters, start)
    splits = [split_task(path, label, test_lines, choose_fraction=choose_fraction, seed=seed) for path, label in tasks]
    train = [encode(tokenizer, t, s.train) for t, s in enumerate(splits)]
    choose = [e for t, s in enumerate(splits) for e in encode(tokenizer, t, s.choose)]
    text = GeneralText(general[1], read_text(general[0])) if general else None
    chunks = text.training_chunks(HFModel("transformers", model, tokenizer), general_tokens) if text and general_tokens else []
    if text and general_tokens and not chunks:
        raise DataError(f"{general[0]}: nothing left to train on after the first windows, which are measured")
    return Session(mixture, tokenizer, splits, train, choose, text, chunks)
