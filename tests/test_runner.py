"""The embedded runner: progress, cancellation and failures leave nothing visible; the CLI's JSON output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merger.errors import Cancelled, StageFailed
from merger.hashing import sha256_file
from merger.orchestrator import check_recipe, run_recipe
from tests.tiny_models import write_yaml

TIES = {
    "merge_method": "ties",
    "base_model": "llama-base",
    "models": [
        {"model": "llama-ft1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "llama-ft2", "parameters": {"weight": 0.5, "density": 0.5}},
    ],
}


def stored_models(settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.iterdir())


def test_progress_counts_every_tensor(settings, store):
    events = []
    [result] = run_recipe(check_recipe(TIES, settings, store, default_name="p"), settings, store, report=events.append)
    progress = [e for e in events if e.phase == "progress"]
    assert events[0].phase == "start" and events[-1].phase == "done" and events[-1].model_id == result.model.id
    totals = {e.total for e in progress}
    assert len(totals) == 1 and totals.pop() > 20
    assert [e.done for e in progress] == list(range(len(progress)))


def test_cancel_mid_merge_leaves_no_model(settings, store):
    seen = []

    def cancel_after_three() -> bool:
        seen.append(1)
        return len(seen) >= 3

    with pytest.raises(Cancelled):
        run_recipe(check_recipe(TIES, settings, store, default_name="c"), settings, store, should_cancel=cancel_after_three)
    assert stored_models(settings) == []
    assert list(settings.staging_dir.iterdir()) == []
    assert store.find("c") is None


def test_engine_failure_names_the_stage_and_leaves_nothing(settings, store):
    # mergekit 0.1.5 cannot write a Gemma 3 config with a changed layer count
    recipe = {"stages": [{"name": "sliced", "merge": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "gemma3-ft1", "layer_range": [0, 3]}]},
        {"sources": [{"model": "gemma3-ft2", "layer_range": [1, 4]}]}]}}]}
    with pytest.raises(StageFailed, match="stage 'sliced' failed in merge"):
        run_recipe(check_recipe(recipe, settings, store, default_name="f"), settings, store)
    assert stored_models(settings) == [] and list(settings.staging_dir.iterdir()) == []


def test_cli_run_json_lists_files_with_their_sha256(settings, tmp_path):
    recipe = write_yaml(tmp_path / "cli-ties.yaml", TIES)
    merger = str(Path(sys.executable).parent / "merger")
    result = subprocess.run([merger, "run", str(recipe), "--json"], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["name"] == "cli-ties" and data["stages"][0]["cache_hit"] is False
    assert {f["path"] for f in data["files"]} >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    for f in data["files"]:
        assert sha256_file(Path(data["path"]) / f["path"]) == f["sha256"]

    again = json.loads(subprocess.run([merger, "run", str(recipe), "--json"], capture_output=True, text=True).stdout)
    assert again["id"] == data["id"] and again["stages"][0]["cache_hit"] is True
