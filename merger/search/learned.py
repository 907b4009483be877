"""The learned-coefficients searcher: gradient descent on one coefficient per (adapter, LoRA module).

The loss is the answer negative log-likelihood on the search's training lines (each step draws the same
number of examples from every task), plus, with ``general_weight`` > 0, that weight times the next-token
negative log-likelihood on one chunk of a general text per step (chunks taken in a seeded order). A step
that would end past ``minutes`` (judged by the last one) is not started. Every ``check_every`` steps, and at the start and the end, the candidate is scored on the search's
choosing lines; the best candidate by the objective is the result.

Objective: the worst task's exact-match rate relative to the best parent on that task (capped at 1), then
the mean relative rate, then the mean answer log-likelihood: compared in that order, so the 0/1 metric
decides and the smooth log-likelihood breaks its ties.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from merger.search.general import text_nll
from merger.search.lora_mix import LoraMixture
from merger.search.scoring import Encoded, TaskScore, answer_nll, make_batch, score


@dataclass(frozen=True)
class LearnOptions:
    steps: int = 40
    examples_per_step: int = 16
    learning_rate: float = 0.05
    minutes: float = 10.0
    check_every: int = 5
    score_batch: int = 16
    seed: int = 0
    general_weight: float = 0.0


@dataclass(frozen=True)
class Checkpoint:
    step: int
    seconds: float
    loss: float | None  # the training loss of the step that led here (None at the start)
    scores: list[TaskScore]
    objective: tuple[float, float, float]


@dataclass
class LearnResult:
    coefficients: torch.Tensor  # the best checkpoint's
    best: Checkpoint
    start: Checkpoint
    parents: list[list[TaskScore]]  # per adapter alone, on the choosing lines
    steps: int  # steps taken (the budget may stop it early)
    seconds: float
    history: list[Checkpoint] = field(default_factory=list)


Progress = Callable[[int, int, Checkpoint | None], None]  # (step, total steps, latest checkpoint)


OBJECTIVE_NAMES = ("worst task, relative exact match", "mean relative exact match", "mean answer log-likelihood")


def objective(scores: list[TaskScore], reference: list[float]) -> tuple[float, float, float]:
    """(worst relative exact match, mean relative exact match, mean log-likelihood); larger is better."""
    relative = [min(1.0, s.exact / r) if r > 0 else 1.0 for s, r in zip(scores, reference, strict=True)]
    return min(relative), sum(relative) / len(relative), sum(s.loglik for s in scores) / len(scores)


def learn(mixture: LoraMixture, train: list[list[Encoded]], choose: list[Encoded], options: LearnOptions, *,
          pad_id: int = 0, general: list[list[int]] = (), progress: Progress = lambda *_: None,
          should_stop: Callable[[], bool] = lambda: False) -> LearnResult:
    """``train[t]``: task t's training examples; ``choose``: every task's choosing examples; ``general``: chunks of
    a general text (token ids) for the ``general_weight`` term."""
    if options.general_weight > 0 and not general:
        raise ValueError("a general-text term needs chunks of the text to train on")
    started = time.monotonic()
    tasks = len(train)
    start_values = mixture.coefficients.detach().clone()

    def scored(values: torch.Tensor) -> list[TaskScore]:
        mixture.set(values)
        return score(mixture.model, choose, tasks, batch_size=options.score_batch, pad_id=pad_id)

    parents = []
    for a in range(len(mixture.targets)):
        alone = torch.zeros_like(start_values)
        alone[a] = 1.0
        parents.append(scored(alone))
    reference = [max(p[t].exact for p in parents) for t in range(tasks)]

    def checkpoint(step: int, loss: float | None) -> Checkpoint:
        values = mixture.coefficients.detach().clone()
        scores = scored(values)
        return Checkpoint(step, time.monotonic() - started, loss, scores, objective(scores, reference))

    mixture.set(start_values)
    start = checkpoint(0, None)
    best, best_values, history = start, start_values, [start]
    progress(0, options.steps, start)
    draw = _Sampler(train, options.seed)
    general_order = random.Random(options.seed).sample(list(general), len(general)) if options.general_weight > 0 else []
    optimizer = torch.optim.Adam([mixture.coefficients], lr=options.learning_rate)
    step, last_step_seconds = 0, 0.0
    while step < options.steps and not should_stop():
        if time.monotonic() - started + last_step_seconds > options.minutes * 60:
            break  # the next step would end past the budget
        step_started = time.monotonic()
        step += 1
        mixture.model.train(False)
        optimizer.zero_grad()
        drawn = draw(options.examples_per_step)
        loss = 0.0
        for t in range(tasks):  # one pass per task: similar lengths, little padding; the gradients add up
            group = [e for e in drawn if e.task == t]
            if group:
                part = answer_nll(mixture.model, make_batch(group, pad_id)) * (len(group) / len(drawn))
                part.backward()
                loss += float(part.detach())
        if general_order:
            part = text_nll(mixture.model, [general_order[(step - 1) % len(general_order)]]) * options.general_weight
            part.backward()
            loss += float(part.detach())
        optimizer.step()
        latest = None
        if step % options.check_every == 0 or step == options.steps:
            latest = checkpoint(step, loss)
            history.append(latest)
            if latest.objective > best.objective:
                best, best_values = latest, mixture.coefficients.detach().clone()
        progress(step, options.steps, latest)
        last_step_seconds = time.monotonic() - step_started
    if history[-1].step != step:  # stopped by the budget between checks
        latest = checkpoint(step, None)
        history.append(latest)
        if latest.objective > best.objective:
            best, best_values = latest, mixture.coefficients.detach().clone()
    mixture.set(best_values)
    return LearnResult(best_values, best, start, parents, step, time.monotonic() - started, history)


class _Sampler:
    """Each call: ``n`` examples, as evenly spread over the tasks as ``n`` allows, each task's drawn without
    replacement until it is used up (then reshuffled)."""

    def __init__(self, tasks: list[list[Encoded]], seed: int):
        self.rng = random.Random(seed)
        self.tasks = [list(t) for t in tasks]
        self.queues: list[list[Encoded]] = [[] for _ in tasks]
        self.next_task = 0

    def __call__(self, n: int) -> list[Encoded]:
        out = []
        for _ in range(n):
            t = self.next_task
            self.next_task = (t + 1) % len(self.tasks)
            if not self.queues[t]:
                self.queues[t] = self.rng.sample(self.tasks[t], len(self.tasks[t]))
            out.append(self.queues[t].pop())
        return out
