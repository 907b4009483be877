"""The metrics, computed over any runtime's ``LoadedModel`` in batches, reporting after each batch.

- perplexity: the text is tokenized without special tokens and cut into windows of ``window`` tokens
  (clipped to the model's context), each starting with BOS where the tokenizer adds one; the last, shorter
  piece is dropped unless it is the only one. exp(mean negative log-likelihood) over every token after the
  first of each window. Windows are independent (no overlap).
- task accuracy: the prompt is tokenized as the model's tokenizer does (BOS added as it adds it), decoded
  greedily for (answer tokens + 1) new tokens; right when the decoded continuation (special tokens
  skipped) starts with the answer exactly. One example a batch.
- multiple choice: for each choice, the summed log-probability of the choice's tokens (tokenized alone,
  no special tokens) after the prompt's tokens; right when the highest (the first, on ties) is the answer.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from merger.evaluation.datasets import Choice, DataError, Generation
from merger.evaluation.runtimes import LoadedModel

Step = Callable[[int, int], None]  # (done, total) after each batch; raises Cancelled to stop


@dataclass(frozen=True)
class Measured:
    values: dict
    tokens: int  # tokens run through the model, for tokens/s
    seconds: float


def perplexity(lm: LoadedModel, text: str, *, window: int, limit: int | None, batch_size: int, step: Step) -> Measured:
    windows = perplexity_windows(lm, text, window)[:limit or None]
    started, nll, scored = time.perf_counter(), 0.0, 0
    step(0, len(windows))
    for start in range(0, len(windows), batch_size):
        for logprobs in lm.token_logprobs(windows[start:start + batch_size]):
            nll -= float(logprobs.double().sum())
            scored += len(logprobs)
        step(min(start + batch_size, len(windows)), len(windows))
    seconds = time.perf_counter() - started
    values = {"perplexity": math.exp(nll / scored), "nll": nll / scored, "scored_tokens": scored,
              "windows": len(windows), "window": len(windows[0])}
    return Measured(values, sum(map(len, windows)), seconds)


def perplexity_windows(lm: LoadedModel, text: str, window: int) -> list[list[int]]:
    prefix = bos_prefix(lm)
    body = min(window, lm.context_length) - len(prefix)
    ids = lm.encode(text, special=False)
    if len(prefix) + len(ids) < 2:
        raise DataError("the text is too short to score (fewer than two tokens)")
    count = max(len(ids) // body, 1)
    return [prefix + ids[i * body:(i + 1) * body] for i in range(count)]


def bos_prefix(lm: LoadedModel) -> list[int]:
    """The special tokens the tokenizer puts before any text (BOS for Gemma, Llama; none for some)."""
    plain, special = lm.encode("a", special=False), lm.encode("a", special=True)
    return special[: len(special) - len(plain)] if special[len(special) - len(plain):] == plain else []


def generation_accuracy(lm: LoadedModel, examples: list[Generation], *, step: Step) -> Measured:
    started, right, tokens = time.perf_counter(), 0, 0
    step(0, len(examples))
    for done, example in enumerate(examples, start=1):
        prompt = lm.encode(example.prompt, special=True)
        new = lm.greedy(prompt, len(lm.encode(example.answer, special=False)) + 1)
        right += lm.decode(new).startswith(example.answer)
        tokens += len(prompt) + len(new)
        step(done, len(examples))
    return Measured({"accuracy": right / len(examples), "right": right, "examples": len(examples)}, tokens,
                    time.perf_counter() - started)


def choice_accuracy(lm: LoadedModel, examples: list[Choice], *, step: Step) -> Measured:
    started, right, tokens = time.perf_counter(), 0, 0
    step(0, len(examples))
    for done, example in enumerate(examples, start=1):
        prompt = lm.encode(example.prompt, special=True)
        if not prompt:
            raise DataError(f"example {done}: the prompt has no tokens, so the first choice token can't be scored")
        continuations = [lm.encode(choice, special=False) for choice in example.choices]
        if not all(continuations):
            raise DataError(f"example {done}: a choice has no tokens")
        sequences = [prompt + continuation for continuation in continuations]
        scores = [float(lp[len(prompt) - 1:].double().sum()) for lp in lm.token_logprobs(sequences)]
        right += scores.index(max(scores)) == example.answer
        tokens += sum(map(len, sequences))
        step(done, len(examples))
    return Measured({"accuracy": right / len(examples), "right": right, "examples": len(examples)}, tokens,
                    time.perf_counter() - started)
