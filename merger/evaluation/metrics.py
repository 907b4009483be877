"""The metrics, computed over any runtime's ``LoadedModel`` in batches, reporting after each batch.

- perplexity: the text is tokenized without special tokens and cut into windows of ``window`` tokens
  (clipped to the model's context), each starting with BOS where the tokenizer adds one; the last, shorter
  piece is dropped unless it is the only one. exp(mean negative log-likelihood) over every token after the
  first of each window. Windows are independent (no overlap).
- task accuracy: the prompt is tokenized as the model's tokenizer does (BOS added as it adds it), decoded
  greedily for (answer tokens + 1) new tokens; right when the decoded continuation (special tokens
  skipped) starts with the answer exactly. ``batch_size`` examples are decoded together (each its own row or
  sequence, stopping at its own length or end of sequence): the same tokens as one at a time. The answer's tokens are
  a guess that one forward pass checks (greedy decoding picks them anyway, or the pass gives its first
  other pick), and a continuation stops once its text starts with or departs from the answer, so a right
  answer costs one pass, not one per token, and a wrong one stops where it goes wrong.
- KL divergence (a quantized model against its unquantized source, on a perplexity text's windows as the
  source tokenizes them; the source runs once for all its quantized models): the
  mean over scored tokens of KL(source || quantized) of the next-token distributions, and the fraction of
  tokens whose most likely next token is the same in both (llama.cpp's perplexity tool reports these two
  as "Mean KLD" and "Same top p"; it scores only the second half of each window, merger every token after
  the first, as for perplexity).
- multiple choice: for each choice, the summed log-probability of the choice's tokens (tokenized alone,
  no special tokens) after the prompt's tokens; right when the highest (the first, on ties) is the answer.
  Every choice of ``batch_size`` examples is scored in one call.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from merger.evaluation.datasets import Choice, DataError, Generation

if TYPE_CHECKING:  # the runtimes (torch) are loaded by whoever measures; lm-eval's harness needs only Measured
    from merger.evaluation.runtimes import LoadedModel

DEFAULT_BATCH = 8  # sequences per forward pass, the recipe's default
Step = Callable[[int, int], None]  # (done, total) after each batch; raises Cancelled to stop


@dataclass(frozen=True)
class Measured:
    values: dict
    tokens: int  # tokens run through the model, for tokens/s
    seconds: float


def perplexity(lm: "LoadedModel", text: str, *, window: int, limit: int | None, batch_size: int, step: Step) -> Measured:
    windows = perplexity_windows(lm, text, window)[:limit or None]
    started, nll = time.perf_counter(), 0.0
    step(0, len(windows))
    for start in range(0, len(windows), batch_size):
        for logprobs in lm.token_logprobs(windows[start:start + batch_size]):
            nll -= float(logprobs.double().sum())
        step(min(start + batch_size, len(windows)), len(windows))
    return Measured(_perplexity_values(nll, windows), sum(map(len, windows)), time.perf_counter() - started)


def _perplexity_values(nll: float, windows: list[list[int]]) -> dict:
    scored = sum(len(ids) - 1 for ids in windows)
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "scored_tokens": scored, "windows": len(windows),
            "window": len(windows[0])}


@dataclass(frozen=True)
class Comparison:
    kl: list[Measured]  # each model against the source
    perplexity: list[Measured | None]  # each model's perplexity, where it cuts the text into the source's windows
    source_perplexity: Measured


def kl_divergence(source: "LoadedModel", models: list["LoadedModel"], text: str, *, window: int, limit: int | None,
                  step: Step) -> Comparison:
    """How far each of ``models`` (quantized copies of ``source``) is from ``source`` on the perplexity windows
    (``source``'s tokenization): the mean KL(source || model) of the next-token distributions, and how often
    their most likely tokens agree. The same passes give the source's perplexity, and each model's where it
    tokenizes the text as the source does.

    A window at a time, each model's logits a block of rows at a time: every statistic of a block is taken
    while it is in cache (a window's are length × vocabulary floats per model; the source's serve all).
    """
    import torch

    from merger.evaluation.runtimes import BLOCK_ROWS

    windows = perplexity_windows(source, text, window)[:limit or None]
    same_windows = [perplexity_windows(lm, text, window)[:limit or None] == windows for lm in models]
    kl, agree, nll, seconds = [0.0] * len(models), [0] * len(models), [0.0] * len(models), [0.0] * len(models)
    source_nll, source_seconds = 0.0, 0.0
    step(0, len(windows))
    for done, ids in enumerate(windows, start=1):
        started = time.perf_counter()
        source_rows = source.next_token_logits(ids)
        shared = [time.perf_counter() - started]  # the source's time, split evenly between the models
        model_rows = []
        for i, lm in enumerate(models):
            started = time.perf_counter()
            model_rows.append(lm.next_token_logits(ids))
            seconds[i] += time.perf_counter() - started
        for start in range(0, len(ids) - 1, BLOCK_ROWS):
            started = time.perf_counter()
            stop = min(start + BLOCK_ROWS, len(ids) - 1)
            reference = source_rows(start, stop)
            targets = torch.tensor(ids[start + 1:stop + 1], device=reference.device)[:, None]
            reference = reference - reference.logsumexp(-1, keepdim=True)
            probabilities, reference_top = reference.exp(), reference.argmax(-1)
            source_nll -= float(reference.gather(-1, targets).double().sum())
            shared.append(time.perf_counter() - started)
            for i, rows in enumerate(model_rows):
                started = time.perf_counter()
                logprobs = rows(start, stop).to(reference.device)  # llama.cpp's are on the CPU
                if logprobs.shape != reference.shape:
                    raise DataError(f"a quantized model's vocabulary ({logprobs.shape[-1]}) differs from its source's "
                                    f"({reference.shape[-1]}); their distributions can't be compared")
                logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True)
                kl[i] += float((probabilities * (reference - logprobs)).sum(-1).double().sum())
                agree[i] += int((reference_top == logprobs.argmax(-1)).sum())
                nll[i] -= float(logprobs.gather(-1, targets).double().sum())
                seconds[i] += time.perf_counter() - started
        source_seconds += sum(shared)
        seconds = [s + sum(shared) / len(models) for s in seconds]
        step(done, len(windows))
    scored, tokens = sum(len(ids) - 1 for ids in windows), sum(map(len, windows))
    return Comparison(
        [Measured({"kl_divergence": kl[i] / scored, "top1_agreement": agree[i] / scored, "scored_tokens": scored,
                   "windows": len(windows), "window": len(windows[0])}, tokens, seconds[i]) for i in range(len(models))],
        [Measured(_perplexity_values(nll[i], windows), tokens, seconds[i]) if same_windows[i] else None for i in range(len(models))],
        Measured(_perplexity_values(source_nll, windows), tokens, source_seconds))


def perplexity_windows(lm: "LoadedModel", text: str, window: int) -> list[list[int]]:
    prefix = bos_prefix(lm)
    body = min(window, lm.context_length) - len(prefix)
    ids = lm.encode(text, special=False)
    if len(prefix) + len(ids) < 2:
        raise DataError("the text is too short to score (fewer than two tokens)")
    count = max(len(ids) // body, 1)
    return [prefix + ids[i * body:(i + 1) * body] for i in range(count)]


def bos_prefix(lm: "LoadedModel") -> list[int]:
    """The special tokens the tokenizer puts before any text (BOS for Gemma, Llama; none for some)."""
    plain, special = lm.encode("a", special=False), lm.encode("a", special=True)
    return special[: len(special) - len(plain)] if special[len(special) - len(plain):] == plain else []


def generation_accuracy(lm: "LoadedModel", examples: list[Generation], *, batch_size: int = DEFAULT_BATCH,
                        step: Step) -> Measured:
    started, right, tokens = time.perf_counter(), 0, 0
    prompts = [lm.encode(example.prompt, special=True) for example in examples]
    answers = [lm.encode(example.answer, special=False) for example in examples]
    budgets = [len(answer) + 1 for answer in answers]
    # examples of similar lengths decode together: less padding, and fewer rows that wait for the longest
    order = sorted(range(len(examples)), key=lambda i: (budgets[i], len(prompts[i])))
    step(0, len(examples))
    for batch in _batches(len(examples), batch_size):
        chosen = [order[i] for i in batch]
        expected = [examples[i].answer for i in chosen]
        settled = (lambda row, new: _decided(lm.decode(new), expected[row])) if lm.decodes_by_appending else None
        outputs = lm.greedy_batch([prompts[i] for i in chosen], [budgets[i] for i in chosen],
                                  guesses=[answers[i] for i in chosen], settled=settled)
        for i, new in zip(chosen, outputs, strict=True):
            right += lm.decode(new).startswith(examples[i].answer)
            tokens += len(prompts[i]) + len(new)
        step(batch.stop, len(examples))
    return Measured({"accuracy": right / len(examples), "right": right, "examples": len(examples)}, tokens,
                    time.perf_counter() - started)


def _decided(text: str, answer: str) -> bool:
    """Whether more tokens can change if ``text`` starts with ``answer``: not once it does, nor once it departs
    from it (an incomplete UTF-8 character at its end, shown as U+FFFD, may still become the answer's)."""
    return text.startswith(answer) or not answer.startswith(text.rstrip("\ufffd"))


def choice_accuracy(lm: "LoadedModel", examples: list[Choice], *, batch_size: int = DEFAULT_BATCH, step: Step) -> Measured:
    started, right, tokens = time.perf_counter(), 0, 0
    step(0, len(examples))
    for batch in _batches(len(examples), batch_size):
        prompts, sequences = [], []
        for i in batch:
            prompt = lm.encode(examples[i].prompt, special=True)
            if not prompt:
                raise DataError(f"example {i + 1}: the prompt has no tokens, so the first choice token can't be scored")
            continuations = [lm.encode(choice, special=False) for choice in examples[i].choices]
            if not all(continuations):
                raise DataError(f"example {i + 1}: a choice has no tokens")
            prompts.append(prompt)
            sequences.append([prompt + continuation for continuation in continuations])
        logprobs = iter(lm.token_logprobs([seq for choices in sequences for seq in choices]))
        for i, prompt, choices in zip(batch, prompts, sequences, strict=True):
            scores = [float(next(logprobs)[len(prompt) - 1:].double().sum()) for _ in choices]
            right += scores.index(max(scores)) == examples[i].answer
            tokens += sum(map(len, choices))
        step(batch.stop, len(examples))
    return Measured({"accuracy": right / len(examples), "right": right, "examples": len(examples)}, tokens,
                    time.perf_counter() - started)


def _batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]
