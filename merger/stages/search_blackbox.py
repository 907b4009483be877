"""The ``search`` stage with ``searcher: blackbox``: Optuna over the parameters of a mergekit merge.

The starting merge (``search.merge``) is planned as a ``merge`` stage (its references, shapes and field paths);
its numbers are the first trial. What the study finds is written as that merge with per-tensor values
(``{filter: <full tensor name>, value}`` lists) for the varied parameters, and the stage makes its output by
running that merge stage: ``merger run`` of the written recipe gives the same model id without searching.
The study is stored in the search database (``MERGER_SEARCH_DATABASE_URL``) under a name derived from the stage
(budget aside) and its inputs' store locations, so running the same search again continues it.
"""

import gc
import random
from collections.abc import Mapping
from pathlib import Path

from merger.errors import Problem, format_loc
from merger.hashing import digest_json
from merger.merge_methods import method_spec
from merger.planning import PlanContext, StageOutput, StagePlan
from merger.progress import CancelCheck, ProgressEvent, Reporter
from merger.recipe import MergeStage, SearchStage
from merger.stages import merge as merge_stage

DIGITS = 6  # significant digits of a searched value (the trial uses the value the recipe writes)
MERGE_WIDE = ("t", "lambda", "normalize", "rescale")


def plan(stage: SearchStage, loc: tuple, context: PlanContext, tasks: list, general: tuple | None,
         problems: list[Problem]) -> tuple[StagePlan | None, list[Problem]]:
    from merger.search.blackbox import METHODS, PER_MODEL

    spec = stage.search
    merged, merge_problems = merge_stage.plan(MergeStage(name=stage.name, merge=spec.merge, seed=stage.seed), loc + ("merge",), context)
    problems += merge_problems
    raw = spec.merge
    method = raw.get("merge_method")
    if method not in METHODS:
        problems.append(Problem(format_loc(loc + ("merge", "merge_method")), f"the blackbox searcher merges with {', '.join(METHODS)}, not {method!r}"))
        return None, problems
    if not isinstance(raw.get("models"), list) or "slices" in raw:
        problems.append(Problem(format_loc(loc + ("merge",)), "a searched merge lists its models (models:), not slices"))
        return None, problems
    known = _parameter_names(method)
    for name in spec.vary:
        if name not in known:
            problems.append(Problem(format_loc(loc + ("vary", name)), f"{method} has no parameter {name!r}; it has {', '.join(sorted(known))}"))
    for where, params in [(("parameters",), raw.get("parameters") or {})] + [
            (("models", i, "parameters"), m.get("parameters") or {}) for i, m in enumerate(raw["models"]) if isinstance(m, dict)]:
        for name, value in params.items() if isinstance(params, dict) else ():
            if not isinstance(value, (int, float)):
                problems.append(Problem(format_loc(loc + ("merge",) + where + (name,)), "a searched merge takes plain numbers (and true / false) as parameters"))
            elif name in spec.vary and not isinstance(value, bool):
                low, high = spec.vary[name]
                if not low <= value <= high:
                    problems.append(Problem(format_loc(loc + ("merge",) + where + (name,)),
                                            f"the starting value {value} is outside vary.{name} [{low}, {high}]"))
            if name in PER_MODEL and where[0] == "parameters":
                problems.append(Problem(format_loc(loc + ("merge",) + where + (name,)), f"give {name} per model (models[i].parameters) in a searched merge"))
    if merged is None or problems:
        return None, problems
    if "weight" in spec.vary:
        for inp in merged.inputs:
            inp.weight = None  # written per tensor, as the merge stage of the written recipe records it
    details = {"merge": merged.details, "tasks": tasks, "general": general, "storage": context.resolver.settings.resolved_search_database_url,
               "num_layers": merged.output_info.num_layers if merged.output_info else None}
    return StagePlan(stage, merged.inputs, merged.output_info, details), []


def _parameter_names(method: str) -> set[str]:
    return {p.name for p in method_spec(method).parameters}


def summary(stage: SearchStage) -> str:
    return f"A `{stage.search.merge['merge_method']}` merge whose parameters merger searched."


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merger.evaluation.datasets import read_text
    from merger.evaluation.runtimes import HFModel
    from merger.search.blackbox import StudyOptions, knobs_for, load_composer, run_study
    from merger.search.general import GeneralText
    from merger.search.learned import OBJECTIVE_NAMES
    from merger.search.scoring import encode
    from merger.search.session import greedy_test_accuracy
    from merger.search.split import parse_lines, split_task
    from merger.stages.search import found_row, perplexity_column, scores_record

    stage: SearchStage = plan.stage
    spec = stage.search
    config = MergeStage(name=stage.name, merge=spec.merge).config
    slots = {slot.reference: slot for slot in plan.details["merge"]["slots"]}
    base_ref = config.base_model if spec.merge["merge_method"] != "linear" else None
    refs = ([base_ref] if base_ref else []) + [m.model for m in config.models if m.model != base_ref]
    start = _start(spec.merge, len(refs) - (base_ref is not None))

    reference_dir = dirs[slots[refs[0]].model_input]
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference_dir, trust_remote_code=False)
    loaders = [lambda ref=ref: _InputTensors(dirs, slots[ref]) for ref in refs]
    granularity = (plan.details["num_layers"] or 1, spec.granularity.layer_groups, list(spec.granularity.modules))
    composer = load_composer(model, spec.merge["merge_method"], 0 if base_ref else None, loaders, start, granularity)
    knobs = knobs_for(composer, spec.vary)

    test_lines = parse_lines(spec.test_lines)
    splits = [split_task(path, label, test_lines, choose_fraction=0, seed=stage.seed) for path, label in plan.details["tasks"]]
    encoded = [encode(tokenizer, t, s.train) for t, s in enumerate(splits)]
    rng = random.Random(stage.seed)
    first = [e for lines in encoded for e in sorted(rng.sample(lines, min(spec.blackbox.first_examples, len(lines))), key=lambda e: e.line)]
    options = StudyOptions(study_name=study_name(stage, dirs), storage_url=plan.details["storage"], trials=spec.budget.trials,
                           minutes=spec.budget.minutes, sampler=spec.blackbox.sampler, first_examples=spec.blackbox.first_examples,
                           promote=spec.blackbox.promote, seed=stage.seed)

    def progress(done: int, total: int, best) -> None:
        report(ProgressEvent(stage.name, "progress", done, total, unit="trials", best=best and best.objective[0]))

    result = run_study(composer, knobs, [e for lines in encoded for e in lines], first, len(splits), options,
                       pad_id=tokenizer.pad_token_id or 0, progress=progress, should_stop=should_cancel, round_to=DIGITS)

    general = GeneralText(plan.details["general"][1], read_text(plan.details["general"][0])) if plan.details["general"] else None
    lm = HFModel("transformers", model, tokenizer)

    def measured(label: str, parameters: dict) -> dict:
        composer.apply(parameters, stage.seed)
        return {"model": label, "test": greedy_test_accuracy(model, tokenizer, splits)} | perplexity_column(general and general.perplexity(lm))

    rows = [measured(str(base_ref), composer.base_only())] if base_ref else []
    first_parent = len(rows)
    rows += [measured(str(ref), composer.alone(j)) for j, ref in enumerate(refs[1:] if base_ref else refs)]
    rows.append(measured("start", composer.parameters_for({})))
    written = written_stage(stage, composer, result.best.params)
    del composer, model, lm
    gc.collect()  # nothing of the search's tensors outlives it into the merge (the model's reference cycles included)

    merge_stage.run(StagePlan(written, plan.inputs, plan.output_info, plan.details["merge"]), dirs, out_dir, work_dir, report, should_cancel)
    rows.append(found_row(out_dir, plan.details["tasks"], test_lines, general))
    parents = [max(row["test"][t] for row in rows[first_parent:-2]) for t in range(len(spec.tasks))]
    record = {
        "searcher": "blackbox",
        "study": options.study_name,
        "sampler": spec.blackbox.sampler,
        "objective": "worst task's exact match relative to the best parent, then the mean, then the answer log-likelihood "
                     "(the search's lines); nsga2: each task's relative exact match",
        "objective_names": list(OBJECTIVE_NAMES),
        "tasks": spec.tasks,
        "test_lines": spec.test_lines,
        "general_text": spec.general_text,
        "knobs": [k.name for k in knobs],
        "trials": len(result.history),
        "trials_this_run": result.trials_run,
        "seconds": round(result.seconds, 1),
        "best_trial": result.best.step,
        "search_scores": {"parents": [scores_record(p) for p in result.parents], "reference": result.reference},
        "history": [vars(r) for r in result.history],
        "pareto": [r.step for r in result.history if r.pareto],
        "test_table": rows,
        "kept": [f / p if p else None for f, p in zip(rows[-1]["test"], parents, strict=True)],
        "objective_at_best": result.best.objective,
    }
    return StageOutput(plan.output_info.architecture if plan.output_info else None, card_relation="merge", made_by=written,
                       origin={"search": record})


def study_name(stage: SearchStage, dirs: list[Path]) -> str:
    """The same search (budget aside: a larger one continues the study) on the same stored inputs: the same study."""
    body = stage.model_dump(mode="json")
    body["search"].pop("budget")
    return f"{stage.name}-{digest_json({'stage': body, 'inputs': [str(d) for d in dirs]})[:16]}"


def _start(merge: dict, others: int) -> dict:
    """The starting merge's parameters: per-model ones as lists over the merged models (not the base)."""
    from merger.search.blackbox import PER_MODEL

    base = merge.get("base_model") if merge["merge_method"] != "linear" else None
    models = [m for m in merge["models"] if m["model"] != base]
    start = {name: value for name, value in (merge.get("parameters") or {}).items() if name in MERGE_WIDE}
    for name in PER_MODEL:
        values = [(m.get("parameters") or {}).get(name) for m in models]
        if any(v is not None for v in values):
            start[name] = [1.0 if v is None and name == "density" else v for v in values]
    start.setdefault("density", [1.0] * others)
    start.setdefault("lambda", 1.0)
    return start


class _InputTensors(Mapping):
    """An input's tensors in float32, each read from its safetensors file when asked for; a ``MODEL+ADAPTER``
    input's with the adapter folded in (float32)."""

    def __init__(self, dirs: list[Path], slot):
        import json

        from safetensors import safe_open

        from merger.lora import LoadedAdapter

        self.files = [safe_open(path, framework="pt") for path in sorted(dirs[slot.model_input].glob("*.safetensors"))]
        self.file_of = {name: f for f in self.files for name in f.keys()}
        self.adapter = None
        if slot.adapter_input is not None:
            adapter_dir = dirs[slot.adapter_input]
            self.adapter = LoadedAdapter.load(adapter_dir, json.loads((adapter_dir / "adapter_config.json").read_text()))

    def __getitem__(self, name: str):
        import torch

        tensor = self.file_of[name].get_tensor(name).to(torch.float32)
        update = self.adapter and self.adapter.update_for(name)
        return tensor if update is None else tensor + update

    def __iter__(self):
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def written_stage(stage: SearchStage, composer, values: dict[str, float]) -> MergeStage:
    """The starting merge with each varied parameter written per tensor (full tensor names as filters), ending
    with the starting value for the tensors no input changes."""
    spec = stage.search
    merge = {key: value for key, value in spec.merge.items()}
    per_tensor = composer.parameters_for(values)
    others = iter(range(len(composer.others)))
    models = []
    base = merge.get("base_model") if merge["merge_method"] != "linear" else None
    for entry in merge["models"]:
        entry = dict(entry)
        if entry["model"] != base:
            j = next(others)
            params = dict(entry.get("parameters") or {})
            for name in spec.vary.keys() & {"weight", "density"}:
                start = composer.start[name][j]
                params[name] = [{"filter": t, "value": per_tensor[t][name][j]} for t in composer.names] + [{"value": start}]
            entry["parameters"] = params
        models.append(entry)
    merge["models"] = models
    wide = spec.vary.keys() & set(MERGE_WIDE)
    if wide:
        params = dict(merge.get("parameters") or {})
        for name in wide:
            params[name] = [{"filter": t, "value": per_tensor[t][name]} for t in composer.names] + [{"value": composer.start[name]}]
        merge["parameters"] = params
    return MergeStage(name=stage.name, merge=merge, seed=stage.seed)
