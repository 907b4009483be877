"""The black-box searcher: an honest split, a study that resumes after a kill or a cancel (trial counts), a
cancel that stores nothing, a written recipe that rebuilds the result (through `merger run` and the real
`mergekit-yaml`), the in-memory trial equal to mergekit's merge, and the same model for the same seed."""

import json
import os
import signal
import subprocess

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

import merger.search.scoring as scoring
import merger.search.session as session
import merger.stages.search as search_stage
import merger.stages.search_blackbox as blackbox_stage
from merger.errors import Cancelled, RecipeError
from merger.orchestrator import check_recipe, rebuild, run_recipe
from merger.recipe import SearchStage
from merger.search.split import parse_lines
from tests.service_harness import BIN, wait_for
from tests.test_mergekit_parity import SEED, mergekit_output, tensors
from tests.test_search import general_text, one_thread, search_inputs  # noqa: F401 - fixtures (one_thread: autouse, one torch thread)
from tests.tiny_models import write_yaml

TEST_LINES = "1-6"
VARY = {"ties": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "dare_ties": {"weight": [0.0, 1.5], "density": [0.1, 1.0]},
        "task_arithmetic": {"weight": [0.0, 1.5], "lambda": [0.5, 1.5]}, "linear": {"weight": [0.1, 1.0]}, "slerp": {"t": [0.0, 1.0]}}


def merge_config(method: str = "ties", adapter: bool = True) -> dict:
    second = "llama-base+search-llama-lora-a" if adapter else "llama-ft2"
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": "llama-base", "models": [{"model": "llama-base"}, {"model": "llama-ft1"}],
                "parameters": {"t": 0.3}, "dtype": "float32"}
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 0.6}},
                                                     {"model": second, "parameters": {"weight": 0.4}}], "dtype": "float32"}
    density = {} if method == "task_arithmetic" else {"density": 0.5}
    return {"merge_method": method, "base_model": "llama-base", "dtype": "float32",
            "models": [{"model": "llama-ft1", "parameters": {"weight": 0.5, **density}}, {"model": second, "parameters": {"weight": 1.0, **density}}]}


def blackbox_recipe(method: str = "ties", trials: int = 4, seed: int = 0, adapter: bool = True, **search) -> dict:
    return {"stages": [{"name": "searched", "seed": seed, "search": {
        "searcher": "blackbox", "merge": merge_config(method, adapter), "vary": VARY[method],
        "granularity": {"layer_groups": 2, "modules": ["attention", "mlp"]},
        "tasks": ["task-a.jsonl", "task-b.jsonl"], "test_lines": TEST_LINES,
        "blackbox": {"first_examples": 3}, "budget": {"trials": trials}, **search}}]}


def run(recipe, settings, store, **options):
    return run_recipe(check_recipe(recipe, settings, store, default_name="r"), settings, store, **options)


def study_trials(settings, name: str | None = None) -> list:
    storage = optuna.storages.RDBStorage(settings.resolved_search_database_url)
    [summary] = [s for s in optuna.get_all_study_summaries(storage) if name is None or s.study_name == name]
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)


def finished(trials) -> list:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_test_lines_are_never_scored_and_every_trial_is_reported(settings, store, search_inputs, monkeypatch):
    scored, generated = [], []
    passes, generation = scoring.answer_logprobs, session.generation_accuracy

    def recording_pass(model, batch):
        scored.extend((e.task, e.line) for e in batch.examples)
        return passes(model, batch)

    def recording_generation(lm, examples, **kw):
        generated.append([e.prompt for e in examples])
        return generation(lm, examples, **kw)

    def searching_generation(*args, **kw):
        raise AssertionError("greedy generation during the search")

    monkeypatch.setattr(scoring, "answer_logprobs", recording_pass)
    monkeypatch.setattr(session, "generation_accuracy", searching_generation)
    import merger.search.blackbox as blackbox  # the stage imports run_study from here when it runs

    searching = blackbox.run_study

    def marked(*args, **kw):
        result = searching(*args, **kw)
        monkeypatch.setattr(session, "generation_accuracy", recording_generation)  # the checks after the search
        return result

    monkeypatch.setattr(blackbox, "run_study", marked)
    monkeypatch.setattr(search_stage, "generation_accuracy", recording_generation)
    events = []
    [result] = run(blackbox_recipe(trials=5), settings, store, report=events.append)

    test = parse_lines(TEST_LINES)
    assert scored and not {line for _, line in scored} & test
    assert {line for _, line in scored} == set(range(1, 17)) - test and {task for task, _ in scored} == {0, 1}
    test_prompts = {json.loads(line)["prompt"] for task in ("task-a", "task-b")
                    for n, line in enumerate((search_inputs / f"{task}.jsonl").read_text().splitlines(), start=1) if n in test}
    assert {p for prompts in generated for p in prompts} == test_prompts

    trials = [e for e in events if e.phase == "progress" and e.unit == "trials"]
    assert [(e.done, e.total) for e in trials] == [(n, 5) for n in range(1, 6)] and all(e.best is not None for e in trials)
    record = result.model.origin["search"]
    assert record["searcher"] == "blackbox" and record["trials"] == 5 and record["study"].startswith("searched-")
    assert [h["step"] for h in record["history"]] == list(range(5))
    for h in record["history"]:
        assert {"step", "objective", "exact", "params", "pareto"} <= h.keys()
        assert len(h["objective"]) == 3 and len(h["exact"]) == 2 and set(h["params"]) == set(record["knobs"])
    assert record["history"][0]["state"] == "complete"  # the recipe's own values, scored on every line
    assert record["history"][0]["params"] == {k: (0.5 if k.startswith("density") else 0.5 if "[1]" in k else 1.0) for k in record["knobs"]}
    assert {h["examples"] for h in record["history"]} <= {6, 20}  # 3 first lines per task, or all 10 per task
    assert [row["model"] for row in record["test_table"]] == ["llama-base", "llama-ft1", "llama-base+search-llama-lora-a", "start", "found"]
    assert record["pareto"] and all(h["state"] == "complete" for h in record["history"] if h["pareto"])


def test_a_killed_search_resumes_from_its_stored_trials(settings, store, search_inputs, tmp_path):
    """`merger search` killed (SIGKILL) once 3 trials are stored; run again, it runs only the rest of the budget,
    and finds what an uninterrupted search finds."""
    recipe = write_yaml(tmp_path / "killed.yaml", blackbox_recipe(trials=8))
    env = {**os.environ, "MERGER_HOME": str(settings.home), "MERGER_MODEL_ROOTS": os.environ["MERGER_MODEL_ROOTS"]}
    proc = subprocess.Popen([str(BIN / "merger"), "search", str(recipe)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def three_stored():
        try:
            return len(finished(study_trials(settings))) >= 3
        except (ValueError, KeyError, optuna.exceptions.StorageInternalError):  # no study (or database) yet
            return proc.poll() is not None

    wait_for(three_stored, 300, "3 finished trials", 0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished(study_trials(settings))
    assert 3 <= len(before) < 8 and not any(settings.models_dir.iterdir())

    [resumed] = run(blackbox_recipe(trials=8), settings, store)
    trials = study_trials(settings)
    record = resumed.model.origin["search"]
    assert len(finished(trials)) == 8 and record["trials"] == 8 and record["trials_this_run"] == 8 - len(before)
    assert [t.params for t in finished(trials)][: len(before)] == [t.params for t in before]  # not run again

    fresh = settings.model_copy(update={"search_database_url": f"sqlite:///{tmp_path / 'fresh.db'}"})
    [uninterrupted] = run_recipe(check_recipe(blackbox_recipe(trials=8), fresh, store, default_name="r"), fresh, store, force=True)
    assert [h["params"] for h in uninterrupted.model.origin["search"]["history"]] == [h["params"] for h in record["history"]]
    assert uninterrupted.model.id == resumed.model.id


def test_a_cancelled_search_stores_nothing_and_resumes(settings, store, search_inputs):
    stop_after = 3

    def cancel_after_three_trials():
        study = study_trials(settings) if settings.home.joinpath("search.db").exists() else []
        return len(finished(study)) >= stop_after if study else False

    with pytest.raises(Cancelled):
        run(blackbox_recipe(trials=6), settings, store, should_cancel=cancel_after_three_trials)
    assert not any(settings.models_dir.iterdir()) and not any(settings.staging_dir.iterdir())
    assert store.find("searched") is None
    assert len(finished(study_trials(settings))) == stop_after

    [result] = run(blackbox_recipe(trials=6), settings, store)
    assert result.model.origin["search"]["trials_this_run"] == 3 and len(finished(study_trials(settings))) == 6


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear", "slerp"])
def test_the_written_recipe_rebuilds_the_result_and_mergekit_yaml_agrees(method, settings, store, search_inputs, tmp_path):
    """`merger run` of the written recipe gives the same id; the real mergekit-yaml on it gives the same tensors."""
    recipe = blackbox_recipe(method, trials=3, adapter=False, seed=SEED)  # mergekit-yaml runs with --random-seed SEED
    [result] = run(recipe, settings, store)
    written = result.model.recipe
    assert "search" not in written and written["merge"]["merge_method"] == method
    values = [c["value"] for m in written["merge"].get("models", []) for c in (m.get("parameters") or {}).get("weight", [])
              if isinstance(c, dict)] + [c["value"] for c in (written["merge"].get("parameters") or {}).get("t", [])]
    assert len(values) > 2  # per-tensor values

    [again] = run({"stages": [written]}, settings, store, force=True)
    assert not again.cache_hit and again.model.id == result.model.id
    assert rebuild(result.model, settings, store).identical

    ours = tensors(store.path_of(result.model))
    theirs = tensors(mergekit_output(written["merge"], search_inputs, tmp_path))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear", "slerp"])
def test_a_trial_in_memory_is_the_merge_mergekit_writes(method, settings, store, search_inputs):
    """The resident model of a trial holds the tensors the written recipe makes (float32; DARE draws differ)."""
    from transformers import AutoModelForCausalLM

    from merger.search.blackbox import knobs_for, load_composer

    stage = SearchStage.model_validate(blackbox_recipe(method, adapter=False)["stages"][0])
    config = stage.search.merge
    names = ["llama-base"] + [m["model"] for m in config["models"] if m["model"] != "llama-base"] if method != "linear" else \
        [m["model"] for m in config["models"]]
    model = AutoModelForCausalLM.from_pretrained(search_inputs / names[0], dtype=torch.float32)
    loaders = [lambda n=n: {k: v.float() for k, v in load_file(search_inputs / n / "model.safetensors").items()} for n in names]
    start = blackbox_stage._start(config, len(names) - (method != "linear"))
    composer = load_composer(model, method, None if method == "linear" else 0, loaders, start, (4, 2, ["attention", "mlp"]))
    knobs = knobs_for(composer, stage.search.vary)
    values = {k.name: round(k.low + (k.high - k.low) * (0.2 + 0.6 * (i % 5) / 4), 4) for i, k in enumerate(knobs)}
    composer.apply(composer.parameters_for(values), seed=0)
    written = blackbox_stage.written_stage(stage, composer, values)
    [result] = run({"stages": [written.model_dump(mode="json")]}, settings, store)
    merged = tensors(store.path_of(result.model))
    resident = model.state_dict()
    for name in composer.names:
        torch.testing.assert_close(resident[name], merged[name].float(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_trials_same_model(settings, store, search_inputs, tmp_path):
    [first] = run(blackbox_recipe("dare_ties", trials=4, seed=5), settings, store)
    other = settings.model_copy(update={"search_database_url": f"sqlite:///{tmp_path / 'other.db'}"})
    [second] = run_recipe(check_recipe(blackbox_recipe("dare_ties", trials=4, seed=5), other, store, default_name="r"), other, store, force=True)
    assert not second.cache_hit and second.model.id == first.model.id
    assert second.model.origin["search"]["history"] == first.model.origin["search"]["history"]


def test_the_test_table_starts_at_the_base_and_shows_the_general_texts_perplexity(settings, store, general_text):
    from merger.evaluation.metrics import perplexity
    from merger.evaluation.runtimes import Transformers

    [result] = run(blackbox_recipe(trials=2, general_text="general.txt"), settings, store)
    rows = result.model.origin["search"]["test_table"]
    assert [row["model"] for row in rows] == ["llama-base", "llama-ft1", "llama-base+search-llama-lora-a", "start", "found"]

    def measured(model_dir) -> float:
        lm = Transformers().load(model_dir, dtype="float32")
        return perplexity(lm, general_text.read_text(), window=512, limit=8, batch_size=1, step=lambda *_: None).values["perplexity"]

    assert rows[0]["perplexity"] == pytest.approx(measured(general_text.parent / "llama-base"), rel=1e-5)
    assert rows[-1]["perplexity"] == pytest.approx(measured(store.path_of(result.model)), rel=1e-5)
    assert len({round(row["perplexity"], 6) for row in rows}) == len(rows)


def test_nsga2_records_a_pareto_front(settings, store, search_inputs):
    [result] = run(blackbox_recipe(trials=4, blackbox={"sampler": "nsga2"}), settings, store)
    record = result.model.origin["search"]
    assert all(h["state"] == "complete" and h["examples"] == 20 for h in record["history"])  # no pruning
    front = [h for h in record["history"] if h["pareto"]]
    assert front and record["best_trial"] in record["pareto"]
    for h in record["history"]:
        dominated = any(all(a >= b for a, b in zip(f["exact"], h["exact"])) and f["exact"] != h["exact"] for f in front)
        assert h["pareto"] != dominated


def test_bad_blackbox_recipes_name_every_problem(settings, store, search_inputs):
    recipe = blackbox_recipe()
    search = recipe["stages"][0]["search"]
    search["merge"]["merge_method"] = "model_stock"
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert any(p.loc == "stages[0].search.merge.merge_method" and "blackbox searcher merges with" in p.msg for p in caught.value.problems)

    recipe = blackbox_recipe()
    search = recipe["stages"][0]["search"]
    search["vary"] = {"weight": [0.0, 0.4], "t": [0, 1]}
    search["merge"]["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]
    search["merge"]["models"][1]["model"] = "missing"
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    problems = {p.loc: p.msg for p in caught.value.problems}
    assert "has no parameter 't'" in problems["stages[0].search.vary.t"]
    assert "outside vary.weight" in problems["stages[0].search.merge.models[0].parameters.weight"]
    assert "plain numbers" in problems["stages[0].search.merge.models[0].parameters.density"]
    assert "stages[0].search.merge.models[1].model" in problems

    recipe = blackbox_recipe()
    del recipe["stages"][0]["search"]["vary"]
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert any("needs merge" in p.msg for p in caught.value.problems)


def test_merger_search_prints_the_table_and_writes_the_found_recipe(settings, store, search_inputs, tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.safe_yaml import load_recipe_file

    recipe = write_yaml(tmp_path / "searching.yaml", blackbox_recipe(trials=2))
    searched = CliRunner().invoke(app, ["search", str(recipe)])
    assert searched.exit_code == 0, searched.output
    model = store.resolve(searched.stdout.strip().splitlines()[-1])
    assert "test lines 1-6" in searched.stderr and "2 trials" in searched.stderr and "found / best parent" in searched.stderr
    found = load_recipe_file(tmp_path / "searching.found.yaml", max_bytes=settings.max_recipe_bytes)
    assert found["stages"][0].pop("provenance") == {"search": model.origin["search"]}  # stated, outside the recipe digest
    assert found == {"stages": [model.recipe]} and "merge" in model.recipe
