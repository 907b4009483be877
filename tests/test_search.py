"""The search stage: an honest split (test lines never scored during the search), a written recipe that
rebuilds the result byte for byte, reproducible for a seed; and, on the real fixtures, the goal itself."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merger.search.learned as learned
import merger.search.scoring as scoring
import merger.search.session as session
import merger.stages.search as search_stage
from merger.errors import RecipeError
from merger.orchestrator import check_recipe, rebuild, run_recipe
from merger.search.split import parse_lines
from merger.settings import Settings
from merger.store import Store
from tests.tiny_models import make_lora

TEST_LINES = "1-6"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a loaded machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def search_inputs(model_root):
    """Two LoRA adapters for llama-base and gemma3-base each, and two prompt/answer task files of 16 lines each."""
    for arch in ("llama", "gemma3"):
        for name, seed, targets in (("lora-a", 11, ("q_proj", "v_proj", "down_proj")), ("lora-b", 12, ("q_proj", "up_proj"))):
            if not (model_root / f"search-{arch}-{name}").exists():
                make_lora(model_root / f"{arch}-base", model_root / f"search-{arch}-{name}", seed=seed, targets=targets)
    rng = random.Random(0)
    for task in ("task-a", "task-b"):
        lines = []
        for _ in range(16):
            prompt = " ".join(f"w{rng.randrange(4, 64)}" for _ in range(rng.randrange(3, 7)))
            answer = " w5" if task == "task-a" else " w7 w8 w9"  # learnable: the coefficients can raise their likelihood
            lines.append(json.dumps({"prompt": prompt, "answer": answer}))
        (model_root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return model_root


def search_recipe(seed: int = 0, steps: int = 4, arch: str = "llama") -> dict:
    return {"stages": [{"name": "searched", "seed": seed, "search": {
        "base": f"{arch}-base", "adapters": [{"path": f"search-{arch}-lora-a", "weight": 0.5}, {"path": f"search-{arch}-lora-b", "weight": 1.0}],
        "tasks": ["task-a.jsonl", "task-b.jsonl"], "test_lines": TEST_LINES,
        "learned": {"examples_per_step": 4, "learning_rate": 1.0, "check_every": 2}, "budget": {"steps": steps}}}]}


def run(recipe, settings, store, **options):
    return run_recipe(check_recipe(recipe, settings, store, default_name="r"), settings, store, **options)


def test_test_lines_are_never_scored_during_the_search(settings, store, search_inputs, monkeypatch):
    """Every teacher-forced pass (training and choosing) and every greedy generation is recorded."""
    scored, generated, searching = [], [], [False]
    passes, generation = scoring.answer_logprobs, session.generation_accuracy
    learn = learned.learn

    def recording_pass(model, batch):
        scored.extend((e.task, e.line) for e in batch.examples)
        return passes(model, batch)

    def recording_generation(lm, examples, **kw):
        generated.append((searching[0], [e.prompt for e in examples]))
        return generation(lm, examples, **kw)

    def marked_learn(*args, **kw):
        searching[0] = True
        try:
            return learn(*args, **kw)
        finally:
            searching[0] = False

    monkeypatch.setattr(scoring, "answer_logprobs", recording_pass)
    monkeypatch.setattr(session, "generation_accuracy", recording_generation)
    monkeypatch.setattr(search_stage, "generation_accuracy", recording_generation)
    monkeypatch.setattr(learned, "learn", marked_learn)

    [result] = run(search_recipe(), settings, store)

    test = parse_lines(TEST_LINES)
    assert scored and not {line for _, line in scored} & test
    assert {task for task, _ in scored} == {0, 1}
    assert {line for _, line in scored} == set(range(1, 17)) - test  # every search line was used
    test_prompts = {json.loads(line)["prompt"] for task in ("task-a", "task-b")
                    for n, line in enumerate((search_inputs / f"{task}.jsonl").read_text().splitlines(), start=1) if n in test}
    assert generated and not any(during for during, _ in generated)  # greedy checks only after the search
    assert {p for _, prompts in generated for p in prompts} == test_prompts
    record = result.model.origin["search"]
    assert [row["model"] for row in record["test_table"]] == ["llama-base", "llama-base + search-llama-lora-a", "llama-base + search-llama-lora-b", "start", "found"]
    assert record["steps"] == 4 and [c["step"] for c in record["history"]] == [0, 2, 4]


def test_written_recipe_rebuilds_the_result_byte_for_byte(settings, store, search_inputs, tmp_path):
    """`merger search` prints the test-line table and writes the found recipe; `merger run` of it makes the same model."""
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.safe_yaml import load_recipe_file
    from tests.tiny_models import write_yaml

    recipe = write_yaml(tmp_path / "searching.yaml", search_recipe())
    searched = CliRunner().invoke(app, ["search", str(recipe)])
    assert searched.exit_code == 0, searched.output
    model = store.resolve(searched.stdout.strip().splitlines()[-1])
    assert "test lines 1-6" in searched.stderr and "found / best parent" in searched.stderr
    picture = tmp_path / "searching.search.svg"
    assert f"picture of the search: {picture}" in searched.stderr and picture.read_text().startswith("<svg")
    cached = CliRunner().invoke(app, ["search", str(recipe), "--json", "--out", str(tmp_path / "again.yaml")])
    assert cached.exit_code == 0, cached.output
    report = json.loads(cached.stdout)
    assert report["id"] == model.id and report["searches"]["searched"]["record"]["test_lines"] == TEST_LINES
    found = load_recipe_file(tmp_path / "searching.found.yaml", max_bytes=settings.max_recipe_bytes)
    assert load_recipe_file(tmp_path / "again.yaml", max_bytes=settings.max_recipe_bytes) == found
    [stated] = found["stages"]
    assert stated.pop("provenance") == {"search": model.origin["search"]} and stated == model.recipe
    written = model.recipe
    assert written["merge"]["merge_method"] == "task_arithmetic" and "search" not in written

    [again] = run(found, settings, store)  # what `merger run searching.found.yaml` does
    differing = {f.path for f in model.files} ^ {f.path for f in again.model.files} | {
        f.path for f in model.files for g in again.model.files if f.path == g.path and f.sha256 != g.sha256}
    assert not again.cache_hit and again.model.id == model.id, differing
    assert again.model.origin == model.origin  # stored already: its record stays the one the search measured
    elsewhere = Settings(home=tmp_path / "elsewhere", model_roots=settings.model_roots, database_url=None)
    [there] = run(load_recipe_file(tmp_path / "searching.found.yaml", max_bytes=settings.max_recipe_bytes), elsewhere, Store(elsewhere))
    assert there.model.id == model.id and there.model.origin == {"search": model.origin["search"], "stated_in_recipe": True}
    values = {c["value"] for m in written["merge"]["models"] for c in m["parameters"]["weight"]}
    assert len(values) > 2  # learned per module, not the starting 0.5 / 1.0
    assert rebuild(model, settings, store).identical


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_per_tensor_weights_are_the_coefficients(settings, store, search_inputs, arch):
    """The written merge is base + sum of c * (the adapter's update), each targeted tensor with its own c."""
    from merger.lora import LoadedAdapter
    from merger.recipe import SearchStage

    stage = SearchStage.model_validate(search_recipe(arch=arch)["stages"][0])
    adapters = [LoadedAdapter.load(search_inputs / a.path, json.loads((search_inputs / a.path / "adapter_config.json").read_text()))
                for a in stage.search.adapters]
    coefficients = [{name: 0.1 + 0.01 * i + 0.5 * a for i, name in enumerate(sorted(adapter.modules))} for a, adapter in enumerate(adapters)]
    written = search_stage.written_stage(stage, coefficients, "bfloat16")
    [result] = run({"stages": [written.model_dump(mode="json")]}, settings, store)

    base = load_file(search_inputs / f"{arch}-base" / "model.safetensors")
    out = load_file(store.path_of(result.model) / "model.safetensors")
    expected = {name: w.float() for name, w in base.items()}
    for adapter, values in zip(adapters, coefficients, strict=True):
        for name in adapter.modules:
            expected[name] += values[name] * adapter.update_for(name)
    assert out.keys() == base.keys()
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor.float(), expected[name].to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_same_seed_same_model(settings, store, search_inputs):
    [first] = run(search_recipe(seed=3), settings, store)
    [second] = run(search_recipe(seed=3), settings, store, force=True)
    assert not second.cache_hit and second.model.id == first.model.id


def test_split_holds_back_the_test_lines(search_inputs):
    from merger.search.split import split_task

    assert parse_lines("1-3, 7,9-10") == {1, 2, 3, 7, 9, 10}
    split = split_task(search_inputs / "task-a.jsonl", "a", parse_lines(TEST_LINES), choose_fraction=0.25, seed=1)
    assert [line.number for line in split.test] == list(range(1, 7))
    assert len(split.choose) == 2 and len(split.train) == 8
    assert split.search_numbers == set(range(7, 17)) and not {line.number for line in split.choose} & {line.number for line in split.train}
    assert split_task(search_inputs / "task-a.jsonl", "a", parse_lines(TEST_LINES), choose_fraction=0.25, seed=1) == split


def test_bad_search_recipes_name_every_problem(settings, store, search_inputs):
    recipe = search_recipe()
    recipe["stages"][0]["search"] |= {"tasks": ["task-a.jsonl", "missing.jsonl", "/etc/hostname"], "adapters": [{"path": "llama-ft1"}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    problems = {p.loc: p.msg for p in caught.value.problems}
    assert {"stages[0].search.tasks[1]", "stages[0].search.tasks[2]", "stages[0].search.adapters[0].path"} <= problems.keys()
    assert "outside the model roots" in problems["stages[0].search.tasks[2]"]
    assert "adapter_config.json" in problems["stages[0].search.adapters[0].path"]

    recipe = search_recipe()
    recipe["stages"][0]["search"]["test_lines"] = "1-16"  # nothing left to search on
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert any(p.loc == "stages[0].search.tasks[0]" and "left for the search" in p.msg for p in caught.value.problems)

    recipe = search_recipe()
    recipe["stages"][0]["search"]["test_lines"] = "50-1"
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert [p.loc for p in caught.value.problems] == ["stages[0].search"]



@pytest.fixture(scope="module")
def general_text(search_inputs):
    """A general text for the tiny models: 3,000 words of their vocabulary, so 8 measured windows and more after them."""
    rng = random.Random(1)
    path = search_inputs / "general.txt"
    path.write_text(" ".join(f"w{rng.randrange(4, 64)}" for _ in range(3000)) + "\n")
    return path


def general_recipe(weight: float) -> dict:
    recipe = search_recipe()
    recipe["stages"][0]["search"]["general_text"] = "general.txt"
    recipe["stages"][0]["search"]["learned"] |= {"general_weight": weight, "general_tokens": 32}
    return recipe


def test_the_test_table_gains_the_general_texts_perplexity(settings, store, general_text):
    from merger.evaluation.metrics import perplexity
    from merger.evaluation.runtimes import Transformers

    [result] = run(general_recipe(0.0), settings, store)
    rows = result.model.origin["search"]["test_table"]
    lm = Transformers().load(store.path_of(result.model), dtype="float32")
    stored = perplexity(lm, general_text.read_text(), window=512, limit=8, batch_size=1, step=lambda *_: None).values
    assert stored["windows"] == 8 and rows[-1]["perplexity"] == pytest.approx(stored["perplexity"])
    assert all(row["perplexity"] > 1 for row in rows) and len({round(row["perplexity"], 6) for row in rows}) == len(rows)


def test_the_general_term_trains_only_on_the_text_after_the_measured_windows(settings, store, general_text, monkeypatch):
    from transformers import AutoTokenizer

    trained, text_nll = [], learned.text_nll

    def recording(model, chunks):
        trained.extend(chunks)
        return text_nll(model, chunks)

    monkeypatch.setattr(learned, "text_nll", recording)
    [without] = run(general_recipe(0.0), settings, store)
    assert not trained
    [weighted] = run(general_recipe(5.0), settings, store)
    assert len(trained) == 4  # one chunk a step
    assert weighted.model.id != without.model.id

    tokenizer = AutoTokenizer.from_pretrained(general_text.parent / "llama-base")
    bos = len(tokenizer("w5").input_ids) - len(tokenizer("w5", add_special_tokens=False).input_ids)
    ids = tokenizer(general_text.read_text(), add_special_tokens=False).input_ids
    measured, body = 8 * (128 - bos), 32 - bos  # 8 windows of the tiny models' 128-token context; chunks of 32
    starts = {tuple(ids[i: i + body]): i for i in range(0, len(ids) - body + 1, body)}
    for chunk in trained:
        assert len(chunk) == 32 and starts[tuple(chunk[bos:])] >= measured


def test_a_general_term_needs_a_readable_general_text(settings, store, search_inputs):
    recipe = search_recipe()
    recipe["stages"][0]["search"]["learned"]["general_weight"] = 1.0
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert [(p.loc, "needs general_text" in p.msg) for p in caught.value.problems] == [("stages[0].search", True)]
    recipe["stages"][0]["search"]["general_text"] = "missing.txt"
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="r")
    assert [p.loc for p in caught.value.problems] == ["stages[0].search.general_text"]


def test_a_stated_provenance_is_a_search_record_and_nothing_else(settings, store, search_inputs):
    """A recipe may state the search that found its merge; it may not plant other origin keys (a Hub id, say)."""
    merge = {"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 0.5}},
                                                  {"model": "llama-ft2", "parameters": {"weight": 0.5}}]}
    for provenance, locs in (({"search": {}, "hub_id": "acme/x"}, {"hub_id"}), ({"hub_id": "acme/x"}, {"hub_id", "search"}), ({}, {"search"})):
        with pytest.raises(RecipeError) as caught:
            check_recipe({"stages": [{"name": "m", "merge": merge, "provenance": provenance}]}, settings, store, default_name="r")
        assert {p.loc for p in caught.value.problems} == {f"stages[0].provenance.{loc}" for loc in locs}, provenance

# --- the real fixtures ----------------------------------------------------------------------------------------

FIXTURES = Path(os.environ.get("MERGER_FIXTURES", REPO.parent / "shared" / "fixtures"))
GEMMA_HOME = os.environ.get("MERGER_HOME")  # read before the fixtures point MERGER_HOME at a temporary store


def _stored_gemma():
    if not GEMMA_HOME or not (FIXTURES / "adapters" / "json").is_dir():
        return None
    home = Store(Settings(home=GEMMA_HOME))
    model = home.find("gemma-3-270m", stored_only=True)
    return (model, home.path_of(model)) if model else None


@pytest.mark.slow
def test_search_keeps_both_fixture_skills_on_lines_it_never_saw(tmp_path, monkeypatch):
    """Gemma 3 270M + the sentiment and json adapters: at least 95% of each parent's accuracy on test lines 1-50."""
    found = _stored_gemma()
    if found is None:
        pytest.skip("needs the fixtures (MERGER_FIXTURES) and MERGER_HOME holding gemma-3-270m (merger import-gguf)")
    gemma, gemma_dir = found
    monkeypatch.setenv("MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGER_MODEL_ROOTS", str(FIXTURES))
    settings = Settings()
    store = Store(settings)
    with store.staging() as staged:  # the same bytes, under the name and Hub id the adapters were made for
        shutil.copytree(gemma_dir, staged / "gemma")
        store.publish(staged / "gemma", name="gemma-3-270m", origin=gemma.origin)
    recipe = {"stages": [{"name": "both-tasks", "search": {
        "base": "gemma-3-270m", "adapters": [{"path": "adapters/sentiment", "weight": 0.25}, {"path": "adapters/json", "weight": 1.0}],
        "tasks": ["tasks/sentiment.jsonl", "tasks/json.jsonl"], "test_lines": "1-50"}}]}
    [result] = run(recipe, settings, store)
    record = result.model.origin["search"]
    assert all(kept >= 0.95 for kept in record["kept"]), record["test_table"]
