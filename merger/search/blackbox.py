"""The black-box searcher: Optuna over a merge's parameters, each trial composed in memory into one resident model.

``Composer`` loads the inputs once (float32) and keeps only the *active* tensors: those where some input differs
from the first (elsewhere every method gives that tensor back, whatever its parameters). A trial's merge is
computed with mergekit's own math for its method (linear, task_arithmetic, ties, dare_ties, slerp) and copied
into the resident model; nothing is written to disk. TIES keeps each task vector's top-``density`` magnitudes
in the order of mergekit's argsort: each element's rank in it is computed once, so a trial's mask is
``rank < k``, the very mask mergekit makes. DARE draws its masks from torch's generator, seeded per trial
(mergekit, seeded alike, draws for every tensor in its own order: the stored merge's DARE masks are other
draws of the same density).

``run_study`` asks Optuna for trials, scores each with the batched teacher-forced scoring on the search's own
lines, and tells the study. The study lives in an SQLAlchemy database (``RDBStorage``), so a search that stops
(killed, cancelled, out of minutes) continues from its stored trials when run again; trials are counted in the
study, not in the process. The sampler is seeded from the stage's seed and the number of finished trials, so
the same seed and the same stored trials give the same next trial, whether or not the process restarted.
"""

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from merger.errors import Cancelled
from merger.search.learned import objective
from merger.search.scoring import Encoded, TaskScore, score

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties")
METHODS = (*TASK_VECTOR_METHODS, "linear", "slerp")
PER_MODEL = ("weight", "density")  # tensor parameters, one value per model
FAMILIES = {"attention": re.compile(r"\.(self_attn|attn|attention)\."), "mlp": re.compile(r"\.(mlp|feed_forward)\.")}
LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Knob:
    """One searched value: a parameter, of one model (per-model parameters) or of the merge, in one group."""

    parameter: str
    model: int | None
    group: str
    low: float
    high: float

    @property
    def name(self) -> str:
        return knob_name(self.parameter, self.model, self.group)


def knob_name(parameter: str, model: int | None, group: str) -> str:
    """``weight[1] layers 0-5 mlp``: the parameter, the model's input index (per-model parameters), the group."""
    return f"{parameter}{'' if model is None else f'[{model}]'} {group}"


def group_of(tensor: str, num_layers: int, layer_groups: int, families: list[str]) -> str:
    """The granularity group of a tensor: its layer group (``layers 0-5``, or ``other`` outside the layers) and,
    when families are separated, its module family (``attention``, ``mlp``, or ``rest``)."""
    found = LAYER.search(tensor)
    if layer_groups == 1:
        where = "all"
    elif found is None:
        where = "outside layers"
    else:
        size = math.ceil(num_layers / layer_groups)
        first = int(found.group(1)) // size * size
        where = f"layers {first}-{min(first + size, num_layers) - 1}"
    if not families:
        return where
    family = next((f for f in families if FAMILIES[f].search(tensor)), "rest")
    return f"{where} {family}"


@dataclass
class Composer:
    """The inputs of a merge, loaded once; ``apply`` writes a candidate merge into ``model``."""

    model: torch.nn.Module  # the resident model (float32)
    method: str
    base_index: int | None  # which input is the base (task-vector methods and slerp)
    start: dict  # parameter -> per-model list (weight, density) or a number (t, lambda, normalize, rescale)
    names: list[str]  # active tensors
    groups: dict[str, str]  # active tensor -> its group
    base: dict[str, torch.Tensor]  # task-vector methods and slerp: the base's active tensors
    inputs: list[dict[str, torch.Tensor]]  # task vectors (task-vector methods) or tensors (linear, slerp) per non-base input
    ranks: list[dict[str, torch.Tensor]] = field(default_factory=list)  # ties: each element's place by magnitude

    @property
    def others(self) -> list[int]:
        """Input indices of the models merged into the base (all inputs when there is no base)."""
        return [i for i in range(len(self.inputs) + (self.base_index is not None)) if i != self.base_index]

    def parameters_for(self, values: dict[str, float]) -> dict[str, dict]:
        """Per active tensor, its parameters: the knobs' ``values`` for its group, the recipe's elsewhere
        (per-model parameters as lists over ``others``)."""
        found = {}
        for tensor in self.names:
            group = self.groups[tensor]
            params = {}
            for parameter, start in self.start.items():
                if parameter in PER_MODEL:
                    params[parameter] = [values.get(knob_name(parameter, m, group), start[j]) for j, m in enumerate(self.others)]
                else:
                    params[parameter] = values.get(knob_name(parameter, None, group), start)
            found[tensor] = params
        return found

    def alone(self, j: int) -> dict[str, dict]:
        """Parameters that give ``others[j]`` as it is (the base plus its whole task vector)."""
        count = len(self.others)
        alone = {"weight": [float(i == j) for i in range(count)], "density": [1.0] * count, "t": 1.0, "lambda": 1.0,
                 "normalize": False, "rescale": False}
        return {n: alone for n in self.names}

    def base_only(self) -> dict[str, dict]:
        """Parameters that give the base as it is (every model's weight 0; slerp's t 0)."""
        count = len(self.others)
        nothing = {"weight": [0.0] * count, "density": [1.0] * count, "t": 0.0, "lambda": 1.0, "normalize": False, "rescale": False}
        return {n: nothing for n in self.names}

    @torch.no_grad()
    def apply(self, per_tensor: dict[str, dict], seed: int) -> None:
        torch.manual_seed(seed)  # DARE's masks
        state = self.model.state_dict()
        for tensor in self.names:
            state[tensor].copy_(self.merged(tensor, per_tensor[tensor]))

    def merged(self, tensor: str, p: dict) -> torch.Tensor:
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask
        from mergekit.merge_methods.slerp import slerp
        from mergekit.sparsify import RescaleNorm, bernoulli, rescaled_masked_tensor

        if self.method == "linear":
            total = sum(w * x[tensor] for w, x in zip(p["weight"], self.inputs, strict=True))
            return total / sum(p["weight"]) if p.get("normalize", True) else total
        if self.method == "slerp":
            return slerp(torch.tensor([p["t"]]), self.base[tensor][None], self.inputs[0][tensor][None])[0]  # a batch of one tensor
        rescale = RescaleNorm.l1 if p.get("rescale", self.method == "dare_ties") else None
        deltas = []
        for j, vectors in enumerate(self.inputs):
            delta = vectors[tensor]
            if self.method == "ties":
                if p["density"][j] < 1:
                    keep = self.ranks[j][tensor] < max(1, int(p["density"][j] * delta.numel()))
                    delta = rescaled_masked_tensor(delta, keep.reshape_as(delta), rescale)
            elif self.method == "dare_ties":
                delta = bernoulli(delta, p["density"][j], rescale)
            deltas.append(delta)
        weights = torch.tensor(p["weight"], dtype=torch.float32).view(-1, *([1] * deltas[0].dim()))
        weighted = torch.stack(deltas) * weights
        if self.method == "task_arithmetic":
            mixed, divisor = weighted.sum(0), weights.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        else:  # TIES sign consensus, by sum
            mask = get_mask(weighted, method="sum")
            mixed, divisor = (weighted * mask).sum(0), (weights * mask).sum(0)
            divisor[divisor == 0] = 1
        if p.get("normalize", self.method == "ties"):
            mixed = mixed / divisor
        return self.base[tensor] + p.get("lambda", 1.0) * mixed


def load_composer(model: torch.nn.Module, method: str, base_index: int | None, tensors: list[Callable[[], Mapping[str, torch.Tensor]]],
                  start: dict, granularity: tuple[int, int, list[str]]) -> Composer:
    """``tensors[i]()`` gives input i's tensors (float32) as a mapping whose tensors are read once each (it may load
    them lazily) and then belong to the composer, which may change them; ``granularity``: (layers, layer groups,
    families).

    One input is held at a time: the reference (the base, or the first input of a linear merge) is copied into
    the resident model, which then stands for it; of every other input only the tensors that differ from it are
    kept, and its task vectors are made from them in place."""
    reference_index = base_index if base_index is not None else 0
    state = model.state_dict()
    kept_apart = {}  # reference tensors the resident model cannot stand for (not among its float32 parameters)
    reference_names = []
    with torch.no_grad():
        for name, tensor in tensors[reference_index]().items():  # the tensors no trial changes are the reference's (an adapter folded in)
            reference_names.append(name)
            if name in state and state[name].dtype == tensor.dtype:
                state[name].copy_(tensor)
            else:
                kept_apart[name] = tensor
    differing = {}  # input index -> its tensors that differ from the reference's
    for i, load in enumerate(tensors):
        if i != reference_index:
            found, differing[i] = load(), {}
            for n in reference_names:
                tensor = found[n]
                if not torch.equal(kept_apart[n] if n in kept_apart else state[n], tensor):
                    differing[i][n] = tensor
            del found
    names = sorted(set().union(*differing.values()))
    missing = [n for n in names if n in kept_apart]
    if missing:
        raise ValueError(f"the resident model has no float32 parameter {missing[0]} (and {len(missing) - 1} more) of the merge's inputs")
    del kept_apart
    layers, layer_groups, families = granularity
    groups = {n: group_of(n, layers, layer_groups, families) for n in names}
    reference = {n: state[n].clone() for n in names}  # the base (or the first input) as the trials start from it

    def tensors_of(i: int) -> dict[str, torch.Tensor]:
        own = differing.pop(i)
        return {n: own[n] if n in own else reference[n].clone() for n in names}

    if base_index is None:  # linear
        inputs = [reference] + [tensors_of(i) for i in sorted(differing)]
        return Composer(model, method, None, start, names, groups, {}, inputs)
    others = [tensors_of(i) for i in sorted(differing)]
    if method in TASK_VECTOR_METHODS:
        with torch.no_grad():
            for x in others:
                for n in names:
                    x[n].sub_(reference[n])  # the task vector, in place of the input's tensor
    ranks = [{n: _ranks(v) for n, v in x.items()} for x in others] if method == "ties" else []
    return Composer(model, method, base_index, start, names, groups, reference, others, ranks)


def _ranks(delta: torch.Tensor) -> torch.Tensor:
    """Each element's place in mergekit's magnitude order (``torch.argsort(|delta|, descending=True)``)."""
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    ranks = torch.empty(order.numel(), dtype=torch.int32)
    ranks[order] = torch.arange(order.numel(), dtype=torch.int32)
    return ranks


def knobs_for(composer: Composer, vary: dict[str, tuple[float, float]]) -> list[Knob]:
    """One knob per varied parameter, per model for per-model parameters, per group that holds active tensors."""
    groups = sorted(set(composer.groups.values()), key=_natural)
    out = []
    for parameter, (low, high) in vary.items():
        models = composer.others if parameter in PER_MODEL else [None]
        out += [Knob(parameter, m, g, low, high) for g in groups for m in models]
    return out


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def start_values(composer: Composer, knobs: list[Knob]) -> dict[str, float]:
    """The recipe's own values (the first trial), clipped into the bounds."""
    out = {}
    for knob in knobs:
        value = composer.start[knob.parameter]
        value = value[composer.others.index(knob.model)] if knob.model is not None else value
        out[knob.name] = min(max(float(value), knob.low), knob.high)
    return out


# --- the study ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyOptions:
    study_name: str
    storage_url: str
    trials: int
    minutes: float
    sampler: str = "tpe"  # tpe | nsga2
    first_examples: int = 8
    promote: float = 0.5
    seed: int = 0
    score_batch: int = 16


@dataclass
class TrialRecord:
    step: int  # the trial's number in the study
    objective: list[float]  # (worst relative exact match, mean relative exact match, mean log-likelihood)
    exact: list[float]  # per task, on the lines it was scored on
    params: dict[str, float]
    examples: int  # lines scored (few for a pruned trial)
    state: str  # complete | pruned
    pareto: bool = False


@dataclass
class StudyResult:
    best: TrialRecord
    history: list[TrialRecord]  # every finished trial of the study, in order
    reference: list[float]  # per task: the best parent's exact match on the search's lines
    parents: list[list[TaskScore]]
    trials_run: int  # trials this run finished
    seconds: float


Progress = Callable[[int, int, TrialRecord | None], None]  # (finished trials, budget, the best so far)


def scalar(value: tuple[float, float, float]) -> float:
    """The objective as one number, ordered as the tuple is (exact-match terms move in steps of at least 1e-4 for
    up to 10,000 lines; the log-likelihood term only breaks their ties)."""
    worst, mean, loglik = value
    return worst + 1e-4 * mean + 1e-6 * math.exp(max(loglik, -50.0))


def run_study(composer: Composer, knobs: list[Knob], examples: list[Encoded], first: list[Encoded], tasks: int, options: StudyOptions, *,
              pad_id: int = 0, progress: Progress = lambda *_: None, should_stop: Callable[[], bool] = lambda: False,
              round_to: int = 6) -> StudyResult:
    """``examples``: every search line of every task; ``first``: the few each trial is scored on first (tpe).
    A trial's values are rounded to ``round_to`` significant digits before use: what a recipe writes is what was scored."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scored = lambda lines: score(composer.model, lines, tasks, batch_size=options.score_batch, pad_id=pad_id)  # noqa: E731
    parents = []
    for j in range(len(composer.others)):  # each model alone
        composer.apply(composer.alone(j), options.seed)
        parents.append(scored(examples))
    reference = [max(p[t].exact for p in parents) for t in range(tasks)]

    multi = options.sampler == "nsga2"
    storage = optuna.storages.RDBStorage(options.storage_url)
    pruner = optuna.pruners.NopPruner() if multi else optuna.pruners.PercentilePruner(100 * (1 - options.promote), n_startup_trials=1)
    study = optuna.create_study(storage=storage, study_name=options.study_name, load_if_exists=True, pruner=pruner,
                                directions=["maximize"] * (tasks if multi else 1))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its process died (one search runs a study at a time)
        study.tell(stale.number, state=TrialState.FAIL)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)):
        study.enqueue_trial(start_values(composer, knobs))
    distributions = {k.name: FloatDistribution(k.low, k.high) for k in knobs}

    def finished() -> list:
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))

    started = time.monotonic()  # the minutes count trials only (loading and scoring the parents aside)
    trials_run, last = 0, 0.0
    while len(finished()) < options.trials and not should_stop():
        if time.monotonic() - started + last > options.minutes * 60:
            break  # the next trial would end past the budget
        trial_started = time.monotonic()
        count = len(finished())
        study.sampler = _sampler(options.sampler, options.seed + count)
        trial = study.ask(distributions)
        params = {name: float(f"{value:.{round_to}g}") for name, value in trial.params.items()}
        composer.apply(composer.parameters_for(params), options.seed)
        record = None
        if not multi:
            early = scored(first)
            trial.report(scalar(objective(early, reference)), 0)
            if trial.should_prune():
                record = _record(trial.number, early, reference, params, "pruned")
                trial.set_user_attr("record", record.__dict__)
                study.tell(trial, state=TrialState.PRUNED)
        if record is None:
            scores = scored(examples)
            record = _record(trial.number, scores, reference, params, "complete")
            trial.set_user_attr("record", record.__dict__)
            study.tell(trial, _relative(record.exact, reference) if multi else scalar(tuple(record.objective)))
        trials_run += 1
        progress(count + 1, options.trials, _best(finished()))
        last = time.monotonic() - trial_started
    if should_stop():
        raise Cancelled("the search was cancelled; its finished trials are kept in the study")
    history = [TrialRecord(**t.user_attrs["record"]) for t in finished()]
    _mark_pareto(history)
    best = _best(finished())
    if best is None:
        raise RuntimeError("the study has no fully scored trial yet: give it more trials or minutes")
    best.pareto = next(r.pareto for r in history if r.step == best.step)
    return StudyResult(best, history, reference, parents, trials_run, time.monotonic() - started)


def _sampler(kind: str, seed: int):
    import optuna

    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _relative(exact: list[float], reference: list[float]) -> list[float]:
    return [min(1.0, e / r) if r > 0 else 1.0 for e, r in zip(exact, reference, strict=True)]


def _record(number: int, scores: list[TaskScore], reference: list[float], params: dict, state: str) -> TrialRecord:
    return TrialRecord(number, list(objective(scores, reference)), [s.exact for s in scores], dict(params),
                       sum(s.examples for s in scores), state)


def _best(trials: list) -> TrialRecord | None:
    """The fully scored trial with the best objective (the earliest of equals)."""
    complete = [TrialRecord(**t.user_attrs["record"]) for t in trials if t.user_attrs.get("record", {}).get("state") == "complete"]
    return max(complete, key=lambda r: (scalar(tuple(r.objective)), -r.step), default=None)


def _mark_pareto(history: list[TrialRecord]) -> None:
    """Fully scored trials that no other fully scored trial beats on every task's exact match (ties: both kept)."""
    complete = [r for r in history if r.state == "complete"]
    for r in complete:
        r.pareto = not any(all(o >= s for o, s in zip(other.exact, r.exact, strict=True)) and other.exact != r.exact for other in complete)
