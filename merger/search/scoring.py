"""Batched teacher-forced scoring of answers: the search's fast stand-in for greedy generation.

An example is its prompt's tokens (BOS added as the tokenizer adds it) followed by its answer's tokens
(tokenized alone). One forward pass over a right-padded batch; the hidden states are gathered at the
positions that predict answer tokens *before* the output layer, so the (large) vocabulary projection runs
only there. An example is an exact match when the argmax is the answer token at every answer position;
its log-likelihood is the mean log-probability of its answer tokens. Every batch the search builds, for
training or scoring, comes from ``make_batch``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merger.search.split import Line


@dataclass(frozen=True)
class Encoded:
    task: int  # index of its task file
    line: int  # its line number in that file
    prompt: tuple[int, ...]
    answer: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    examples: tuple[Encoded, ...]
    input_ids: torch.Tensor  # [batch, longest - 1]
    attention_mask: torch.Tensor
    rows: torch.Tensor  # per answer token: its example's row
    positions: torch.Tensor  # per answer token: the position that predicts it
    targets: torch.Tensor  # per answer token: its id


@dataclass(frozen=True)
class TaskScore:
    exact: float  # fraction of examples whose every answer token is the argmax
    loglik: float  # mean over examples of the mean log-probability of their answer tokens
    examples: int


def encode(tokenizer, task: int, lines: Sequence[Line]) -> list[Encoded]:
    out = []
    for line in lines:
        prompt = tokenizer(line.example.prompt, add_special_tokens=True).input_ids
        answer = tokenizer(line.example.answer, add_special_tokens=False).input_ids
        out.append(Encoded(task, line.number, tuple(prompt), tuple(answer)))
    return out


def make_batch(examples: Sequence[Encoded], pad_id: int = 0) -> Batch:
    """The last answer token is never an input: a sequence is prompt + answer[:-1]."""
    sequences = [e.prompt + e.answer[:-1] for e in examples]
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, positions, targets = [], [], []
    for row, (example, seq) in enumerate(zip(examples, sequences, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        for k, token in enumerate(example.answer):
            rows.append(row)
            positions.append(len(example.prompt) - 1 + k)
            targets.append(token)
    return Batch(tuple(examples), ids, mask, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets))


def answer_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each answer token, whether it is the argmax), in ``batch.targets`` order."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[batch.rows, batch.positions]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logprobs = logits.log_softmax(-1)
    picked = logprobs.gather(-1, batch.targets[:, None])[:, 0]
    return picked, logits.argmax(-1) == batch.targets


def per_example(batch: Batch, values: torch.Tensor, reduce: str) -> torch.Tensor:
    """Answer-token values reduced per example (``mean`` or ``all``)."""
    count = len(batch.examples)
    if reduce == "all":
        wrong = torch.zeros(count).index_add_(0, batch.rows, (~values).float())
        return wrong == 0
    sums = torch.zeros(count, dtype=values.dtype).index_add(0, batch.rows, values)
    return sums / torch.tensor([len(e.answer) for e in batch.examples], dtype=values.dtype)


def answer_nll(model, batch: Batch) -> torch.Tensor:
    """The training loss: mean over examples of the mean negative log-likelihood of their answer tokens."""
    logprobs, _ = answer_logprobs(model, batch)
    return -per_example(batch, logprobs, "mean").mean()


@torch.no_grad()
def score(model, examples: Sequence[Encoded], tasks: int, *, batch_size: int = 16, pad_id: int = 0) -> list[TaskScore]:
    """Each task's exact-match rate and answer log-likelihood over ``examples``."""
    exact = [[] for _ in range(tasks)]
    loglik = [[] for _ in range(tasks)]
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.answer))  # similar lengths pad less
    for start in range(0, len(ordered), batch_size):
        batch = make_batch(ordered[start : start + batch_size], pad_id)
        logprobs, hits = answer_logprobs(model, batch)
        for example, hit, ll in zip(batch.examples, per_example(batch, hits, "all"), per_example(batch, logprobs, "mean"), strict=True):
            exact[example.task].append(float(hit))
            loglik[example.task].append(float(ll))
    return [TaskScore(sum(e) / len(e) if e else 0.0, sum(l) / len(l) if l else 0.0, len(e)) for e, l in zip(exact, loglik, strict=True)]
