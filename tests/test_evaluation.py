"""Evaluation: perplexity and accuracies against hand computations, the evaluate stage and its cache, the
CLI, the API, GGUF models under transformers and llama.cpp, and lm-evaluation-harness tasks."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from merger import devices
from merger.errors import Cancelled, RecipeError
from merger.evaluation import harness, runtimes
from merger.evaluation.datasets import DataError, task_file, text_file
from merger.evaluation.runtimes import CannotEvaluate, Transformers, llama_cpp_available
from merger.evaluation.suite import Options, evaluate
from merger.orchestrator import check_recipe, run_recipe
from merger.store import Parent
from tests.tiny_gguf import write_llama_gguf
from tests.tiny_models import VOCAB, WORDS, make_sentencepiece_model, save_model, write_yaml

MERGER = str(Path(sys.executable).parent / "merger")


def word_text(n_words: int, seed: int, words: list[str] | None = None) -> str:
    """Random words of the tiny WordLevel vocabulary (w4..w63), or of ``words``."""
    rng = random.Random(seed)
    words = words or [f"w{i}" for i in range(4, VOCAB)]
    return " ".join(rng.choice(words) for _ in range(n_words))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_chain_model(path: Path) -> Path:
    """A Llama whose greedy next token is always the successor of the current one: w10 -> w11 -> w12 ...

    Attention and MLP outputs are zeroed, so the last hidden state is the normalized one-hot embedding of
    the current token (8 e_i), and ``lm_head`` maps e_i to the logit 8 for token i+1 (0 for the others).
    """
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-12,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="float32")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    successor = torch.zeros(VOCAB, VOCAB)
    for token in range(VOCAB):
        successor[4 + (token - 3) % (VOCAB - 4), token] = 1.0  # w4..w62 -> next word, w63 -> w4; specials -> w4...
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB))
        model.lm_head.weight.copy_(successor)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return save_model(model, path)


@pytest.fixture(scope="session")
def eval_root(model_root) -> Path:
    """``eval/`` under the model root: the chain model, a SentencePiece Llama (BOS first), and evaluation data."""
    root = model_root / "eval"
    make_chain_model(root / "chain")
    make_sentencepiece_model(root, "llama")
    data = root / "data"
    data.mkdir()
    (data / "words.txt").write_text(word_text(300, seed=1))
    (data / "spm.txt").write_text(word_text(300, seed=2, words=WORDS))
    jsonl(data / "chain-tasks.jsonl", [
        {"prompt": "w10", "answer": "w11"},  # right
        {"prompt": "w20 w21", "answer": "w22 w23"},  # right: the continuation is w22 w23 w24
        {"prompt": "w30", "answer": "w35"},  # wrong
        {"prompt": "w40", "answer": "w41"},  # right
    ])
    jsonl(data / "chain-mc.jsonl", [
        {"prompt": "w10", "choices": ["w30", "w11", "w12"], "answer": 1},  # right
        {"prompt": "w20", "choices": ["w21 w22", "w21 w40"], "answer": 0},  # right
        {"prompt": "w5", "choices": ["w6", "w7"], "answer": 1},  # wrong: w6 follows w5
    ])
    return root


def registered(store, root: Path, path: str):
    return store.register_directory(root / path, name=Path(path).name)


def hand_perplexity(model_dir: Path, text: str, window: int) -> float:
    """exp(mean NLL) over windows of ``window`` tokens (BOS first where the tokenizer adds it), plain torch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if tokenizer("the").input_ids[0] == tokenizer.bos_token_id else []
    body = window - len(prefix)
    nll = []
    with torch.no_grad():
        for start in range(0, len(ids) - body + 1, body):
            window_ids = torch.tensor([prefix + ids[start:start + body]])
            logprobs = torch.log_softmax(model(window_ids).logits[0, :-1].double(), dim=-1)
            nll.append(-logprobs.gather(1, window_ids[0, 1:, None])[:, 0])
    return math.exp(torch.cat(nll).mean().item())


# --- the metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [("llama-base", "words.txt"), ("gemma3-base", "words.txt"), ("eval/llama-spm", "spm.txt")])
def test_perplexity_matches_a_hand_computation(settings, store, model_root, eval_root, name, text, monkeypatch):
    monkeypatch.setattr(runtimes, "BLOCK_ROWS", 5)  # a window's 31 rows of logits in 7 blocks
    path = eval_root / "data" / text
    model = registered(store, model_root, name)
    report = evaluate(store, [model], [text_file(path, text)], Options(window=32, batch_size=3, parents=False, dtype="float32"))
    [result] = report.results
    expected = hand_perplexity(model_root / name, path.read_text(), 32)
    assert result.row.values["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result.row.values["window"] == 32 and result.row.tokens_per_second > 0
    assert result.row.runtime == "transformers" and not result.cache_hit


@pytest.mark.parametrize("name, cap", [("gemma3-base", None), ("gemma3-base", 0.05), ("llama-base", None)])
def test_the_output_layer_on_blocks_of_rows_gives_the_models_own_logits(model_root, name, cap, monkeypatch):
    monkeypatch.setattr(runtimes, "HEAD_ROWS", 8)
    lm = Transformers().load(model_root / name, dtype="float32")
    lm.model.config.final_logit_softcapping = cap  # Gemma's forward caps its logits with it
    lm._head = lm._split_head()
    ids = list(range(4, 40))
    rows = lm.next_token_logits(ids)
    with torch.no_grad():
        expected = lm.model(input_ids=torch.tensor([ids])).logits[0, :-1]
        uncapped = lm.model.get_output_embeddings()(lm.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state)
    blocks = [rows(0, 5), rows(5, 8), rows(8, 11), rows(11, 27), rows(27, 35)]  # within one block of 8, and across
    assert lm._head is not None and torch.allclose(torch.cat(blocks), expected, rtol=1e-5, atol=1e-7)
    if cap is not None:  # the capping is in effect
        assert expected.abs().max() < cap < uncapped.abs().max()


def test_a_head_that_does_not_give_the_models_logits_is_not_split(model_root):
    lm = Transformers().load(model_root / "llama-base", dtype="float32")
    lm.model.config.final_logit_softcapping = 1e-3  # Llama's forward ignores it: capping alone would be wrong
    assert lm._split_head() is None


def test_models_with_the_same_tokenizer_files_share_one_tokenizer(model_root, tmp_path):
    """A merge and its parents carry the same tokenizer files: it is loaded once (Gemma 3's took about 4 s)."""
    shutil.copytree(model_root / "gemma3-base", tmp_path / "edited")
    config = tmp_path / "edited" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 77}))
    base, tuned, edited = (Transformers().load(d, dtype="float32").tokenizer
                           for d in (model_root / "gemma3-base", model_root / "gemma3-ft1", tmp_path / "edited"))
    assert base is tuned
    assert edited is not base and edited.model_max_length == 77


def test_auto_dtype_is_float32_unless_the_cpu_multiplies_the_stored_one_faster(settings, store, model_root, eval_root, monkeypatch):
    model = registered(store, model_root, "llama-base")  # stored in bfloat16
    data = text_file(eval_root / "data" / "words.txt", "words.txt")

    def auto_on(bfloat16_faster: bool):  # a CPU whose bfloat16 products are faster than float32 ones, or not
        monkeypatch.setattr(runtimes, "faster_than_float32", lambda dtype: dtype == "bfloat16" and bfloat16_faster)
        return evaluate(store, [model], [data], Options(window=32, limit=2, parents=False, dtype="auto")).results[0]

    slower, faster = auto_on(False), auto_on(True)
    assert slower.row.settings["dtype"] == "float32" and faster.row.settings["dtype"] == "bfloat16"
    assert slower.row.values["perplexity"] != faster.row.values["perplexity"]
    for dtype in ("float32", "bfloat16"):
        assert evaluate(store, [model], [data], Options(window=32, limit=2, parents=False, dtype=dtype)).results[0].cache_hit


def test_the_dtype_probe_times_this_cpu(model_root):
    runtimes.faster_than_float32.cache_clear()
    made = []
    real = runtimes._product
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtimes, "_product", lambda dtype: made.append(dtype) or real(dtype))
        first = runtimes.faster_than_float32("bfloat16")
        assert runtimes.faster_than_float32("bfloat16") is first  # timed once per process
    assert made == [torch.bfloat16, torch.float32]
    assert runtimes.auto_dtype(model_root / "llama-base") == ("bfloat16" if first else "float32")


def test_perplexity_limit_counts_windows(settings, store, eval_root):
    model = registered(store, eval_root, "llama-spm")
    data = text_file(eval_root / "data" / "spm.txt", "spm.txt")
    [result] = evaluate(store, [model], [data], Options(window=16, limit=3, parents=False)).results
    assert result.row.values["windows"] == 3 and result.row.values["scored_tokens"] == 3 * 15


def test_task_accuracy_counts_exactly_the_right_answers(settings, store, eval_root):
    chain = registered(store, eval_root, "chain")
    path = eval_root / "data" / "chain-tasks.jsonl"
    [result] = evaluate(store, [chain], [task_file(path, "tasks")], Options(parents=False)).results
    assert result.row.metric == "task_accuracy"
    assert result.row.values == {"accuracy": 0.75, "right": 3, "examples": 4}
    [limited] = evaluate(store, [chain], [task_file(path, "tasks")], Options(parents=False, limit=2)).results
    assert limited.row.values["accuracy"] == 1.0


def test_multiple_choice_picks_the_most_likely_continuation(settings, store, eval_root):
    chain = registered(store, eval_root, "chain")
    path = eval_root / "data" / "chain-mc.jsonl"
    [result] = evaluate(store, [chain], [task_file(path, "mc")], Options(parents=False)).results
    assert result.row.metric == "multiple_choice"
    assert result.row.values == {"accuracy": pytest.approx(2 / 3), "right": 2, "examples": 3}


@pytest.mark.parametrize("name", ["llama-base", "gemma3-base", "eval/llama-spm"])
def test_batched_greedy_decodes_exactly_what_one_at_a_time_does(model_root, eval_root, name):
    lm = Transformers().load(model_root / name, dtype="float32")
    words = WORDS if name.endswith("spm") else [f"w{i}" for i in range(4, VOCAB)]
    rng = random.Random(3)
    prompts = [lm.encode(" ".join(rng.choice(words) for _ in range(length)), special=True) for length in (1, 7, 3, 12, 2, 5)]
    budgets = [4, 1, 6, 3, 5, 2]
    alone = [lm.greedy(prompt, budget) for prompt, budget in zip(prompts, budgets)]
    assert len({len(p) for p in prompts}) == 6 and [len(a) for a in alone] == budgets
    assert lm.greedy_batch(prompts, budgets) == alone
    assert lm.greedy_batch(prompts[::-1], budgets[::-1]) == alone[::-1]


def test_batched_greedy_stops_each_sequence_at_its_end_of_sequence(eval_root):
    lm = Transformers().load(eval_root / "chain", dtype="float32")
    eos, w40 = lm.tokenizer.eos_token_id, lm.encode("w40", special=False)[0]
    with torch.no_grad():  # w40 is now followed by end-of-sequence
        lm.model.lm_head.weight[:, w40] = 0.0
        lm.model.lm_head.weight[eos, w40] = 1.0
    prompts = [lm.encode(text, special=True) for text in ("w38", "w10 w11", "w39")]
    out = lm.greedy_batch(prompts, [6, 6, 6])
    assert [lm.decode(new) for new in out] == ["w39 w40", "w12 w13 w14 w15 w16 w17", "w40"]
    assert out[0][-1] == eos and out[2][-1] == eos and len(out[1]) == 6
    assert out == [lm.greedy(prompt, 6) for prompt in prompts]


def assert_guesses_change_no_token(lm, prompts: list[list[int]], budget: int) -> None:
    """Guessed continuations (right, right then wrong, wrong, none, longer than the budget) and settling
    change no greedy token: the output is the greedy continuation, or with ``settled`` a prefix of it."""
    alone = [lm.greedy(prompt, budget) for prompt in prompts]
    assert all(len(tokens) == budget for tokens in alone)

    def wrong(token: int) -> int:
        return 5 if token == 4 else 4

    guesses = [alone[0], alone[1][:1] + [wrong(alone[1][1])] + alone[1][2:], [wrong(alone[2][0])] * 3, [], alone[4] + [4, 4]]
    budgets = [budget] * len(prompts)
    assert lm.greedy_batch(prompts, budgets, guesses=guesses) == alone
    assert lm.greedy_batch(prompts, budgets, settled=lambda row, new: len(new) >= row) == [a[:max(row, 1)] for row, a in enumerate(alone)]
    cut = lm.greedy_batch(prompts, budgets, guesses=guesses, settled=lambda row, new: True)
    assert cut[0] == alone[0] and cut[1] == alone[1][:2] and cut[2] == alone[2][:1] and cut[3] == alone[3][:1]


@pytest.mark.parametrize("name, seed", [("llama-base", 4), ("gemma3-base", 4), ("eval/llama-spm", 5)])  # no early end
def test_guessed_continuations_change_no_greedy_token(model_root, eval_root, name, seed):
    lm = Transformers().load(model_root / name, dtype="float32")
    words = WORDS if name.endswith("spm") else [f"w{i}" for i in range(4, VOCAB)]
    rng = random.Random(seed)
    assert_guesses_change_no_token(lm, [lm.encode(" ".join(rng.choice(words) for _ in range(n)), special=True) for n in (3, 1, 6, 2, 4)], 4)


def test_task_accuracy_is_the_same_in_any_batch_size(settings, store, eval_root):
    chain = registered(store, eval_root, "chain")
    items = [task_file(eval_root / "data" / "chain-tasks.jsonl", "tasks"), task_file(eval_root / "data" / "chain-mc.jsonl", "mc")]
    values = [[r.row.values for r in evaluate(store, [chain], items, Options(parents=False, batch_size=size), force=True).results]
              for size in (1, 2, 3, 16)]
    assert values[0] == [{"accuracy": 0.75, "right": 3, "examples": 4}, {"accuracy": pytest.approx(2 / 3), "right": 2, "examples": 3}]
    assert all(v == values[0] for v in values)


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": "b"}', "", "{not json"], r"bad.jsonl:3: not JSON"),
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "choices": ["x", "y"], "answer": 0}'], r"bad.jsonl:2: a multiple-choice example in a file of prompt/answer"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'], r"bad.jsonl:1: \"answer\" must be the index"),
    (['{"question": "a", "answer": "b"}'], r'bad.jsonl:1: expected an object with a string "prompt"'),
    ([], r"bad.jsonl: no examples"),
])
def test_bad_task_files_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        task_file(jsonl(tmp_path / "bad.jsonl", lines), "bad.jsonl")


def test_an_architecture_transformers_lacks_is_named(settings, store, model_root, tmp_path):
    import shutil

    strange = tmp_path / "strange"
    shutil.copytree(model_root / "llama-base", strange)
    config = json.loads((strange / "config.json").read_text())
    (strange / "config.json").write_text(json.dumps(config | {"model_type": "no-such-model", "architectures": ["NoSuchForCausalLM"]}))
    model = store.register_directory(strange)
    data = jsonl(tmp_path / "t.jsonl", [{"prompt": "w4", "answer": "w5"}])
    with pytest.raises(CannotEvaluate, match=r"strange: transformers \S+ can't load it as a causal language model"):
        evaluate(store, [model], [task_file(data, "t.jsonl")], Options(parents=False))


# --- the evaluate stage ---------------------------------------------------------------------------------------------

MERGE_THEN_EVALUATE = {"stages": [
    {"name": "merged", "merge": {"merge_method": "ties", "base_model": "llama-base", "models": [
        {"model": "llama-ft1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "llama-ft2", "parameters": {"weight": 0.5, "density": 0.5}}]}},
    {"name": "scores", "evaluate": {"models": ["merged"], "tasks": ["eval/data/chain-tasks.jsonl"],
                                    "perplexity": ["eval/data/words.txt"], "limit": 2, "window": 32}},
]}


def test_merge_then_evaluate_stores_results_for_the_merge_and_its_parents_once(settings, store, eval_root, monkeypatch):
    events = []
    results = run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store,
                         report=events.append)
    merged, scores = results
    assert scores.model is None and not scores.cache_hit
    relations = {s.model.name: s.relation for s in scores.evaluation.subjects}
    assert relations == {"merged": "evaluated", "llama-base": "base", "llama-ft1": "donor ×0.5", "llama-ft2": "donor ×0.5"}
    stored = stored_rows(store, scores)
    assert all(len(rows) == 2 for rows in stored.values())
    assert {dataset for _key, dataset, _at in stored["merged"]} == {"eval/data/chain-tasks.jsonl", "eval/data/words.txt"}
    progress = [e for e in events if e.stage == "scores" and e.phase == "progress"]
    assert progress[-1].unit.startswith("windows") or progress[-1].unit.startswith("examples")
    assert {(e.done, e.total) for e in progress} >= {(0, 2), (2, 2)}  # after each batch (both fit one)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a cached evaluation loaded a model")

    monkeypatch.setattr(Transformers, "load", no_loading)
    again = run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store)[1]
    assert again.cache_hit and all(r.cache_hit for r in again.evaluation.results)
    assert stored_rows(store, again) == stored


def test_a_gpu_this_machine_lacks_evaluates_on_the_cpu_under_the_cpus_key(settings, store, eval_root, monkeypatch):
    on_cpu = run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store)[1]
    monkeypatch.setenv("MERGER_DEVICE", "cuda:99")
    assert devices.resolve("cuda:99") == "cpu"
    again = run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store)[1]
    assert again.cache_hit and stored_rows(store, again) == stored_rows(store, on_cpu)
    assert all("device" not in r.row.settings for r in again.evaluation.results)


def stored_rows(store, result) -> dict[str, list[tuple]]:
    return {s.model.name: [(r.cache_key, r.dataset, r.created_at) for r in store.evaluations(s.model.id)]
            for s in result.evaluation.subjects}


def test_evaluations_of_a_model_are_shared_between_merges(settings, store, eval_root):
    """A second merge of the same parents measures only itself."""
    run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store)
    other = json.loads(json.dumps(MERGE_THEN_EVALUATE))
    other["stages"][0]["merge"]["merge_method"] = "linear"
    other["stages"][0]["merge"].pop("base_model")
    for m in other["stages"][0]["merge"]["models"]:
        m["parameters"] = {"weight": 0.5}
    other["stages"][0]["merge"]["models"].append({"model": "llama-base", "parameters": {"weight": 0.0}})
    scores = run_recipe(check_recipe(other, settings, store, default_name="o"), settings, store)[1]
    fresh = {r.subject.model.name for r in scores.evaluation.results if not r.cache_hit}
    assert fresh == {"merged"}


def test_cancel_between_batches(settings, store, model_root, eval_root):
    checks = []

    def cancel_on_second_check() -> bool:
        checks.append(1)
        return len(checks) >= 2

    model = registered(store, model_root, "llama-base")
    data = text_file(eval_root / "data" / "words.txt", "words.txt")
    with pytest.raises(Cancelled):
        evaluate(store, [model], [data], Options(window=16, batch_size=1, parents=False), should_cancel=cancel_on_second_check)
    assert store.evaluations(model.id) == []


def test_validation_names_every_evaluation_problem(settings, store, eval_root, tmp_path):
    bad = jsonl(eval_root / "data" / "bad-line.jsonl", ['{"prompt": "a", "answer": "b"}', '{"prompt": 1}'])
    recipe = {"stages": [{"name": "scores", "evaluate": {
        "models": ["llama-base", "nope"], "tasks": ["eval/data/missing.jsonl", str(bad)], "perplexity": ["/etc/hostname"]}}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="v")
    problems = {p.loc: p.msg for p in caught.value.problems}
    assert "is not a stage" in problems["stages[0].evaluate.models[1]"]
    assert "not a file under the model roots" in problems["stages[0].evaluate.tasks[0]"]
    assert "bad-line.jsonl:2:" in problems["stages[0].evaluate.tasks[1]"]
    assert "outside the model roots" in problems["stages[0].evaluate.perplexity[0]"]


def test_an_evaluate_stage_is_no_model_for_later_stages(settings, store, eval_root):
    recipe = {"stages": [
        {"name": "scores", "evaluate": {"models": ["llama-base"], "perplexity": ["eval/data/words.txt"]}},
        {"name": "m", "merge": {"merge_method": "linear", "models": [{"model": "scores", "parameters": {"weight": 1.0}}]}}]}
    with pytest.raises(RecipeError, match=r"stages\[1\].merge.models\[0\].model: 'scores' is not a stage"):
        check_recipe(recipe, settings, store, default_name="n")


# --- CLI and API --------------------------------------------------------------------------------------------------


def test_cli_eval_prints_one_table_and_json(settings, store, eval_root, tmp_path):
    data = eval_root / "data"
    recipe = write_yaml(tmp_path / "merge-eval.yaml", MERGE_THEN_EVALUATE)
    wide = {**os.environ, "COLUMNS": "250"}
    ran = subprocess.run([MERGER, "run", str(recipe)], capture_output=True, text=True, env=wide)
    assert ran.returncode == 0, ran.stderr
    assert "donor ×0.5" in ran.stderr and ran.stdout.strip() == store.find("merged").id

    args = [MERGER, "eval", "merged", "--tasks", str(data / "chain-tasks.jsonl"), "--perplexity", str(data / "words.txt"),
            "--limit", "2", "--window", "32"]
    table = subprocess.run(args, capture_output=True, text=True, env=wide)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for name, relation in [("merged", "evaluated"), ("llama-base", "base"), ("llama-ft1", "donor ×0.5")]:
        assert any(name in line and relation in line and "transformers" in line for line in lines), table.stdout
    assert "chain-tasks.jsonl" in table.stdout and "words.txt" in table.stdout and "tokens/s" in table.stdout

    as_json = json.loads(subprocess.run(args + ["--json", "--no-parents"], capture_output=True, text=True).stdout)
    [merged] = as_json["models"]
    assert merged["relation"] == "evaluated" and {r["metric"] for r in merged["results"]} == {"task_accuracy", "perplexity"}
    assert all(r["cache_hit"] for r in merged["results"])  # the same settings as the recipe's stage: cached

    bad = jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "b"}', "{oops"])
    failed = subprocess.run([MERGER, "eval", "merged", "--tasks", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1 and f"{bad}:2: not JSON" in failed.stderr and "Traceback" not in failed.stderr


def test_api_lists_a_models_evaluations_to_those_who_may_see_it(settings, store, eval_root):
    from fastapi.testclient import TestClient

    from merger.service.api import create_app
    from merger.access import grant
    from merger.service.auth import create_token

    results = run_recipe(check_recipe(MERGE_THEN_EVALUATE, settings, store, default_name="r"), settings, store)
    merged = results[0].model
    with store.session.begin() as s:
        alice, bob = create_token(s, "alice"), create_token(s, "bob")
        grant(s, [merged.id], "alice", owner=True)
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/models/{merged.id[:12]}/evals", headers={"Authorization": f"Bearer {alice}"})
        assert response.status_code == 200
        rows = response.json()
        assert {(r["metric"], r["dataset"]) for r in rows} == {("task_accuracy", "eval/data/chain-tasks.jsonl"),
                                                               ("perplexity", "eval/data/words.txt")}
        assert all(r["runtime"] == "transformers" and r["limit"] == 2 for r in rows)
        hidden = client.get(f"/v1/models/{merged.id}/evals", headers={"Authorization": f"Bearer {bob}"})
        assert hidden.status_code == 404


def test_a_job_that_evaluates_runs_and_lets_its_owner_see_what_it_measured(settings, store, eval_root):
    from merger.access import can_see
    from merger.service.jobs import Jobs

    queued = []
    jobs = Jobs(settings, store, lambda job_id, _queue: queued.append(job_id))
    only_evaluate = {"stages": [MERGE_THEN_EVALUATE["stages"][1] | {"evaluate": {
        "models": ["llama-base"], "perplexity": ["eval/data/words.txt"], "limit": 1, "window": 32}}]}
    for recipe, made in ((MERGE_THEN_EVALUATE, "merged"), (MERGE_THEN_EVALUATE, "merged"), (only_evaluate, None)):
        job = jobs.submit("carol", recipe, name="r")
        assert job.state == "queued"  # never answered from the cache: an evaluation runs (cheaply when cached)
        jobs.execute(job.id)
        done = jobs.get(job.id)
        assert done.state == "succeeded", done.error_message
        assert done.model_id == (store.find(made).id if made else None)
    with store.session() as s:
        assert all(can_see(s, store.find(name).id, "carol") for name in ("merged", "llama-base", "llama-ft1"))


# --- GGUF ---------------------------------------------------------------------------------------------------------


def stored_gguf(store, source_dir: Path, tmp_path: Path, *, tokenizer: bool = True):
    """A GGUF model as the quantize stage stores it: one .gguf and a card; lineage relation ``quantized``."""
    source = store.register_directory(source_dir, name=source_dir.name)
    staged = tmp_path / "gguf-staged"
    staged.mkdir()
    write_llama_gguf(source_dir, staged / "model-f32.gguf", tokenizer=tokenizer)
    (staged / "README.md").write_text("---\nbase_model_relation: quantized\n---\n# llama-spm-gguf\n")
    return store.publish(staged, name="llama-spm-gguf", parents=[Parent(source.id, "quantized", "base")])[0], source


def gguf_report(store, eval_root, model, runtime: str):
    data = eval_root / "data"
    items = [text_file(data / "spm.txt", "spm.txt"), task_file(own_answers(eval_root, data), "own")]
    return evaluate(store, [model], items, Options(window=32, runtime=runtime, dtype="float32"))


def own_answers(eval_root: Path, data: Path) -> Path:
    """Prompts answered with the unquantized model's own greedy continuation (right), or not (wrong)."""
    path = data / "spm-own.jsonl"
    if path.exists():
        return path
    lm = Transformers().load(eval_root / "llama-spm", dtype="float32")
    rows = []
    for prompt in (f"{a} {b}" for a in WORDS for b in WORDS):
        continuation = lm.decode(lm.greedy(lm.encode(prompt, special=True), 3))
        if continuation.isascii() and continuation.strip():  # a random model also emits lone UTF-8 bytes
            wrong = next(w for w in WORDS if not continuation.startswith(w))
            rows.append({"prompt": prompt, "answer": continuation if len(rows) % 2 == 0 else wrong})
        if len(rows) == 4:
            return jsonl(path, rows)
    raise AssertionError("the random model continued no prompt with plain text")


def test_gguf_under_transformers_matches_its_source(settings, store, eval_root, tmp_path):
    gguf, source = stored_gguf(store, eval_root / "llama-spm", tmp_path)
    report = gguf_report(store, eval_root, gguf, "transformers")
    by = {(r.subject.model.name, r.data.label): r.row for r in report.results if r.row.metric != "kl_divergence"}
    assert {s.model.name: s.relation for s in report.subjects} == {
        "llama-spm-gguf": "evaluated", "llama-spm": "unquantized source"}
    assert by["llama-spm-gguf", "spm.txt"].runtime == "transformers-gguf"
    assert by["llama-spm-gguf", "spm.txt"].values["perplexity"] == pytest.approx(by["llama-spm", "spm.txt"].values["perplexity"], rel=1e-6)
    assert by["llama-spm-gguf", "own"].values["accuracy"] == by["llama-spm", "own"].values["accuracy"] == 0.5


def test_gguf_without_a_tokenizer_borrows_the_sources(settings, store, eval_root, tmp_path):
    gguf, _ = stored_gguf(store, eval_root / "llama-spm", tmp_path, tokenizer=False)
    data = eval_root / "data"
    result, kl = evaluate(store, [gguf], [text_file(data / "spm.txt", "spm.txt")], Options(window=32, runtime="transformers", parents=False, dtype="float32")).results
    assert kl.row.values["kl_divergence"] == pytest.approx(0, abs=1e-6) and kl.row.values["top1_agreement"] == 1.0
    assert result.row.values["perplexity"] == pytest.approx(hand_perplexity(eval_root / "llama-spm", (data / "spm.txt").read_text(), 32), rel=1e-5)


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_gguf_under_llama_cpp_matches_its_source(settings, store, eval_root, tmp_path):
    gguf, _ = stored_gguf(store, eval_root / "llama-spm", tmp_path)
    report = gguf_report(store, eval_root, gguf, "auto")
    by = {(r.subject.model.name, r.data.label): r.row for r in report.results if r.row.metric != "kl_divergence"}
    assert by["llama-spm-gguf", "spm.txt"].runtime == "llama.cpp" and by["llama-spm", "spm.txt"].runtime == "transformers"
    assert by["llama-spm-gguf", "spm.txt"].values["perplexity"] == pytest.approx(by["llama-spm", "spm.txt"].values["perplexity"], rel=1e-4)
    assert by["llama-spm-gguf", "own"].values["accuracy"] == 0.5
    [kl] = [r.row for r in report.results if r.row.metric == "kl_divergence"]  # an F32 GGUF: the same distributions
    assert kl.runtime == "llama.cpp" and kl.values["kl_divergence"] < 1e-4 and kl.values["top1_agreement"] > 0.99


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_guessed_continuations_change_no_greedy_token_under_llama_cpp(settings, store, eval_root, tmp_path):
    from merger.evaluation.runtimes import LlamaCpp

    gguf, _ = stored_gguf(store, eval_root / "llama-spm", tmp_path)
    lm = LlamaCpp().load(store.path_of(gguf), dtype="float32")
    rng = random.Random(5)
    assert_guesses_change_no_token(lm, [lm.encode(" ".join(rng.choice(WORDS) for _ in range(n)), special=True) for n in (3, 1, 6, 2, 4)], 4)


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_logits_read_in_place_are_llama_cpp_pythons(settings, store, eval_root, tmp_path):
    from llama_cpp import Llama

    from merger.evaluation.runtimes import LlamaCpp

    gguf, _ = stored_gguf(store, eval_root / "llama-spm", tmp_path)
    lm = LlamaCpp().load(store.path_of(gguf), dtype="float32")
    ids = lm.encode(word_text(40, seed=6, words=WORDS), special=True)
    llm = Llama(model_path=str(next(store.path_of(gguf).glob("*.gguf"))), n_ctx=len(ids), logits_all=True, verbose=False)
    llm.eval(ids)
    scores = torch.from_numpy(llm.scores[:len(ids)])
    rows = lm.next_token_logits(ids)
    assert torch.allclose(torch.cat([rows(0, 7), rows(7, len(ids) - 1)]), scores[:-1], rtol=1e-5, atol=1e-6)
    assert lm.greedy(ids[:9], 1) == [int(scores[8].argmax())]


def tiny_llama_cpp(store, eval_root, tmp_path):
    from merger.evaluation.runtimes import LlamaCpp

    gguf, _ = stored_gguf(store, eval_root / "llama-spm", tmp_path)
    return LlamaCpp().load(store.path_of(gguf), dtype="float32")


def spm_sequences(lm, lengths: list[int]) -> list[list[int]]:
    return [lm.encode(word_text(200, seed=n, words=WORDS), special=True)[:n] for n in lengths]


def same_logprobs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the last bits: llama.cpp's CPU kernels may sum in another order for a batch of another size
    (seen with AVX-512: 3e-6 apart on one position of a 128-token sequence)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_decodes_sequences_together_as_one_at_a_time(settings, store, eval_root, tmp_path):
    lm = tiny_llama_cpp(store, eval_root, tmp_path)
    sequences = spm_sequences(lm, [40, 3, 128, 17, 60, 2])
    together = lm.token_logprobs(sequences)
    assert all(same_logprobs(a, b) for a, b in zip(together, [lm.token_logprobs([seq])[0] for seq in sequences], strict=True))
    prompts, budgets = spm_sequences(lm, [5, 1, 30, 12, 7]), [1, 6, 3, 0, 5]
    assert lm.greedy_batch(prompts, budgets) == [lm.greedy(prompt, budget) for prompt, budget in zip(prompts, budgets)]


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_splits_what_its_cache_cannot_hold_at_once(settings, store, eval_root, tmp_path, monkeypatch):
    whole = tiny_llama_cpp(store, eval_root, tmp_path)
    monkeypatch.setattr(runtimes, "LLAMA_CPP_MAX_CONTEXT", 256)  # the smallest cache llama.cpp makes
    monkeypatch.setattr(runtimes, "LLAMA_CPP_SEQUENCES", 3)
    lm = runtimes.LlamaCpp().load(store.path_of(store.find("llama-spm-gguf")), dtype="float32")
    assert lm.context_length == 128  # one sequence: the model's trained context
    sequences = spm_sequences(lm, [120, 100, 90, 30, 20, 10, 5])  # 375 tokens: more than one decode holds
    assert lm._packs([len(seq) for seq in sequences], [len(seq) - 1 for seq in sequences]) == [range(0, 2), range(2, 5), range(5, 7)]
    monkeypatch.setattr(runtimes, "LOGITS_BUDGET_BYTES", 100 * 320 * 4)  # logits of 100 positions (320 tokens' vocabulary)
    assert lm._packs([len(seq) for seq in sequences], [len(seq) - 1 for seq in sequences]) == [range(0, 1), range(1, 2), range(2, 3), range(3, 6), range(6, 7)]
    assert all(same_logprobs(a, b) for a, b in zip(lm.token_logprobs(sequences), whole.token_logprobs(sequences), strict=True))
    prompts, budgets = spm_sequences(lm, [110, 100, 20, 60]), [10, 20, 40, 8]
    assert lm.greedy_batch(prompts, budgets) == whole.greedy_batch(prompts, budgets)
    with pytest.raises(CannotEvaluate, match="129 tokens do not fit llama.cpp's context of 128"):
        lm.token_logprobs([sequences[-1], sequences[0] + sequences[-2][:9]])
    with pytest.raises(CannotEvaluate, match="130 tokens do not fit llama.cpp's context of 128"):
        lm.greedy_batch([prompts[0]], [20])


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_frees_its_model_with_the_loaded_model(settings, store, eval_root, tmp_path):
    lm = tiny_llama_cpp(store, eval_root, tmp_path)
    model, context = lm._model, lm._context  # they refer to each other: the garbage collector alone would free them
    del lm
    assert model.model is None and context.ctx is None


def test_a_gguf_header_is_read_as_ggufs_reader_reads_it(eval_root, tmp_path):
    from gguf import GGUFReader

    from merger.modelfiles import ModelDirError, inspect_dir

    (tmp_path / "model").mkdir()
    gguf = write_llama_gguf(eval_root / "llama-spm", tmp_path / "model" / "model-f32.gguf")  # metadata: strings, arrays of them
    reader = GGUFReader(gguf)
    info = inspect_dir(gguf.parent)
    assert info.model_type == reader.get_field("general.architecture").contents() == "llama"
    assert info.tensors == {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    gguf.write_bytes(gguf.read_bytes()[:2000])  # cut inside the metadata
    with pytest.raises(ModelDirError, match="not a readable GGUF file"):
        inspect_dir(gguf.parent)


def test_quantize_then_evaluate_compares_the_gguf_with_its_source(settings, store, eval_root):
    from merger.gguf_tools import GgufToolsMissing, find_converter

    try:
        find_converter(settings.tools_dir)
    except GgufToolsMissing as exc:
        pytest.skip(str(exc))
    recipe = {"stages": [
        {"name": "q8", "quantize": {"model": "eval/llama-spm", "type": "Q8_0"}},
        {"name": "scores", "evaluate": {"models": ["q8"], "perplexity": ["eval/data/spm.txt"], "window": 32}}]}
    _q8, scores = run_recipe(check_recipe(recipe, settings, store, default_name="q"), settings, store)
    rows = {(r.subject.model.name, r.row.metric): (r.subject.relation, r.row) for r in scores.evaluation.results}
    assert rows.keys() == {("q8", "perplexity"), ("q8", "kl_divergence"), ("llama-spm", "perplexity")}
    assert rows["llama-spm", "perplexity"][0] == "unquantized source"
    assert rows["q8", "perplexity"][1].runtime == ("llama.cpp" if llama_cpp_available() else "transformers-gguf")
    assert rows["q8", "perplexity"][1].values["perplexity"] == pytest.approx(rows["llama-spm", "perplexity"][1].values["perplexity"], rel=0.02)
    kl = rows["q8", "kl_divergence"][1].values
    assert 0 < kl["kl_divergence"] < 0.05 and kl["top1_agreement"] > 0.8


def hand_kl(source_dir: Path, quantized_dir: Path, text: str, window: int) -> tuple[float, float, int]:
    """Mean KL(source || quantized) and top-1 agreement over the perplexity windows, plain torch in float64."""
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (source_dir, quantized_dir)]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if tokenizer("the").input_ids[0] == tokenizer.bos_token_id else []
    body, kl, agree, scored = window - len(prefix), 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - body + 1, body):
            window_ids = torch.tensor([prefix + ids[start:start + body]])
            p, q = (torch.log_softmax(m(window_ids).logits[0, :-1].double(), dim=-1) for m in models)
            kl += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            scored += window_ids.shape[1] - 1
    return kl / scored, agree / scored, scored


def test_kl_divergence_of_a_quantized_model_matches_a_hand_computation(settings, store, model_root, eval_root, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(runtimes, "BLOCK_ROWS", 5)  # a window's 31 rows of logits in 7 blocks

    from rich.console import Console

    from merger.evaluation.table import render

    source = registered(store, model_root, "llama-base")
    shutil.copytree(model_root / "llama-ft1", tmp_path / "staged")  # stands in for a quantized copy of llama-base
    quantized = store.publish(tmp_path / "staged", name="ft1-as-quantized", parents=[Parent(source.id, "quantized", "base")])[0]
    path = eval_root / "data" / "words.txt"
    report = evaluate(store, [quantized], [text_file(path, "words.txt")], Options(window=32, batch_size=3, dtype="float32"))
    [data] = report.data
    values = report.result(quantized.id, data, "kl_divergence").row.values
    kl, top1, scored = hand_kl(model_root / "llama-base", model_root / "llama-ft1", path.read_text(), 32)
    assert kl > 0.001 and values["kl_divergence"] == pytest.approx(kl, rel=1e-4)
    assert values["top1_agreement"] == top1 < 1 and values["scored_tokens"] == scored
    assert report.result(source.id, data, "kl_divergence") is None  # the source is not compared with itself
    console = Console(record=True, width=300)
    console.print(render(report))
    shown = console.export_text()
    assert "KL" in shown and "top-1" in shown and f"{kl:.4f}" in shown and f"{top1:.1%}" in shown
    again = evaluate(store, [quantized], [text_file(path, "words.txt")], Options(window=32, batch_size=3, dtype="float32"))
    assert all(r.cache_hit for r in again.results) and len(again.results) == 3


# --- lm-evaluation-harness ----------------------------------------------------------------------------------------

LM_EVAL_TASK = """\
task: chain_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: chain-mc.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(not harness.available(), reason="lm-eval is not installed")
def test_lm_eval_local_task_agrees_with_multiple_choice(settings, store, eval_root):
    task = eval_root / "data" / "chain_mc.yaml"
    task.write_text(LM_EVAL_TASK)
    recipe = {"stages": [{"name": "harness", "evaluate": {"models": ["eval/chain"], "lm_eval": ["eval/data/chain_mc.yaml"],
                                                          "tasks": ["eval/data/chain-mc.jsonl"]}}]}
    [result] = run_recipe(check_recipe(recipe, settings, store, default_name="h"), settings, store)
    by_metric = {r.row.metric: r.row.values for r in result.evaluation.results}
    assert by_metric["lm_eval"]["metrics"]["acc,none"] == pytest.approx(2 / 3)
    assert by_metric["multiple_choice"]["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.skipif(not harness.available(), reason="lm-eval is not installed")
def test_lm_eval_tasks_that_name_code_or_remote_data_are_refused(settings, store, eval_root):
    data = eval_root / "data"
    (data / "code.yaml").write_text(LM_EVAL_TASK + "process_docs: !function utils.process\n")
    (data / "remote.yaml").write_text(LM_EVAL_TASK.replace("dataset_path: json", "dataset_path: org/some-dataset"))
    recipe = {"stages": [{"name": "h", "evaluate": {"models": ["eval/chain"], "lm_eval": ["eval/data/code.yaml", "eval/data/remote.yaml"]}}]}
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, settings, store, default_name="h")
    problems = {p.loc: p.msg for p in caught.value.problems}
    assert "!function" in problems["stages[0].evaluate.lm_eval[0]"]
    assert "merger never downloads" in problems["stages[0].evaluate.lm_eval[1]"]
