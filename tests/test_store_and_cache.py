"""Cache hits, byte-identical recomputation, lineage of multi-stage recipes, and the model card."""

import os
import uuid

import pytest
import yaml
from sqlalchemy import create_engine, text

from merger.graph import ancestors
from merger.hashing import manifest, manifest_id
from merger.orchestrator import check_recipe, run_recipe
from merger.settings import Settings
from merger.store import Store

DARE = {
    "merge_method": "dare_ties",
    "base_model": "gemma3-base",
    "models": [
        {"model": "gemma3-ft1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "gemma3-ft2", "parameters": {"weight": 0.5, "density": 0.5}},
    ],
}

TWO_STAGES = {
    "stages": [
        {"name": "blend", "merge": {"merge_method": "linear", "models": [
            {"model": "gemma3-ft1", "parameters": {"weight": 0.5}}, {"model": "gemma3-ft2", "parameters": {"weight": 0.5}}]}},
        {"name": "final", "merge": {"merge_method": "ties", "base_model": "gemma3-base", "models": [
            {"model": "blend", "parameters": {"weight": 0.7, "density": 0.6}},
            {"model": "gemma3-ft2", "parameters": {"weight": 0.3, "density": 0.6}}]}},
    ]
}


def run(recipe: dict, settings, store, **kwargs):
    return run_recipe(check_recipe(recipe, settings, store, default_name="r"), settings, store, **kwargs)


def test_rerun_is_a_cache_hit_and_force_is_byte_identical(settings, store):
    [first] = run(DARE, settings, store)
    stored = store.path_of(first.model)
    files_before = {e.path: e.sha256 for e in manifest(stored)}

    [again] = run(DARE, settings, store)
    assert again.cache_hit and again.model.id == first.model.id
    runs = store.runs()
    assert [r.cache_hit for r in runs] == [False, True]
    assert len(list(settings.staging_dir.iterdir())) == 0

    [forced] = run(DARE, settings, store, force=True)
    assert not forced.cache_hit
    assert [r.cache_hit for r in store.runs()] == [False, True, False]
    assert forced.model.id == first.model.id  # the id is the hash of every file: same bytes
    assert {e.path: e.sha256 for e in manifest(stored)} == files_before
    assert manifest_id(manifest(stored)) == first.model.id


def test_seed_changes_a_randomized_merge(settings, store):
    [a] = run({**DARE, "seed": 1}, settings, store)
    [b] = run({**DARE, "seed": 2}, settings, store)
    assert a.model.id != b.model.id


def test_changed_input_content_misses_the_cache(settings, store, model_root, tmp_path):
    import shutil

    root = model_root / f"copy-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_root / "gemma3-ft2", root)
    recipe = {**DARE, "models": [DARE["models"][0], {"model": root.name, "parameters": {"weight": 0.5, "density": 0.5}}]}
    [first] = run(recipe, settings, store)
    config = root / "generation_config.json"
    config.write_text(config.read_text().replace("}", ', "temperature": 0.5}', 1))
    [second] = run(recipe, settings, store)
    assert not second.cache_hit
    shutil.rmtree(root)


def test_two_stage_lineage_and_card(settings, store):
    blend, final = run(TWO_STAGES, settings, store)
    assert [p.parent.name for p in blend.model.parents] == ["gemma3-ft1", "gemma3-ft2"]
    edges = {e.parent.name: e for e in final.model.parents}
    assert set(edges) == {"blend", "gemma3-ft2", "gemma3-base"}
    assert edges["blend"].parent_id == blend.model.id
    assert (edges["blend"].relation, edges["blend"].role, edges["blend"].weight) == ("merge", "donor", 0.7)
    assert (edges["gemma3-base"].relation, edges["gemma3-base"].role) == ("merge", "base")
    assert final.model.recipe["merge"]["merge_method"] == "ties"
    assert {"merger", "mergekit", "torch", "transformers"} <= set(final.model.versions)

    tree = ancestors(store, final.model.id)
    assert [tree.nodes[parent].name for edge, parent in tree.next_of(blend.model.id)] == ["gemma3-ft1", "gemma3-ft2"]
    assert [e.loc for e in tree.edges if e.child == final.model.id] == [
        "stages[1].merge.models[0].model", "stages[1].merge.models[1].model", "stages[1].merge.base_model"]

    card = (store.path_of(final.model) / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model_relation"] == "merge"
    assert sorted(front["base_model"]) == ["blend", "gemma3-base", "gemma3-ft2"]
    assert blend.model.id in card and "ties" in card and final.model.recipe_digest in card


def test_exported_model_loads_in_transformers(settings, store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merger.cli import app  # noqa: F401  (the CLI's export uses the same Store.export)

    [result] = run(DARE, settings, store)
    out = store.export(result.model, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


POSTGRES_ADMIN_URL = os.environ.get("MERGER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url():
    name = f"merger_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_store_on_postgresql(settings, postgres_url, monkeypatch):
    monkeypatch.setenv("MERGER_DATABASE_URL", postgres_url)
    pg_settings = Settings()
    pg_store = Store(pg_settings)
    assert pg_store.session.kw["bind"].dialect.name == "postgresql"
    blend, final = run(TWO_STAGES, pg_settings, pg_store)
    assert [r.cache_hit for r in pg_store.runs()] == [False, False]
    run(TWO_STAGES, pg_settings, pg_store)
    assert [r.cache_hit for r in pg_store.runs()] == [False, False, True, True]
    assert pg_store.find(final.model.id[:10]).id == final.model.id
    assert {e.parent.name for e in pg_store.get(final.model.id).parents} == {"blend", "gemma3-ft2", "gemma3-base"}
    pg_store.session.kw["bind"].dispose()


def test_recipes_refer_to_stored_models_by_name_and_id_prefix(settings, store, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path


    blend, _final = run(TWO_STAGES, settings, store)
    by_name = {"merge_method": "linear", "models": [{"model": "blend", "parameters": {"weight": 0.5}},
                                                    {"model": "gemma3-base", "parameters": {"weight": 0.5}}]}
    by_id = {**by_name, "models": [{"model": blend.model.id[:10], "parameters": {"weight": 0.5}}, by_name["models"][1]]}
    [a] = run(by_name, settings, store)
    [b] = run(by_id, settings, store)
    weights = lambda m: {f.path: f.sha256 for f in m.files if f.path.endswith(".safetensors")}  # noqa: E731
    assert weights(a.model) == weights(b.model)  # same inputs; the cards differ (they quote the recipe)
    assert {e.parent_id for e in a.model.parents} >= {blend.model.id}

    merger = str(Path(sys.executable).parent / "merger")
    tree = json.loads(subprocess.run([merger, "lineage", a.model.id[:8], "--json"], capture_output=True, text=True, check=True).stdout)
    names = {n["id"]: n["name"] for n in tree["nodes"]}
    assert sorted(names[e["parent"]] for e in tree["edges"] if e["child"] == blend.model.id) == ["gemma3-ft1", "gemma3-ft2"]
    shown = json.loads(subprocess.run([merger, "show", "blend", "--json"], capture_output=True, text=True, check=True).stdout)
    assert shown["id"] == blend.model.id and shown["recipe"]["merge"]["merge_method"] == "linear"
    out = tmp_path / "exported"
    subprocess.run([merger, "export", "blend", str(out)], check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(f["path"] for f in shown["files"])
    missing = subprocess.run([merger, "show", "nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no model 'nope'" in missing.stderr and "Traceback" not in missing.stderr


def test_unchanged_inputs_are_not_hashed_again(settings, store, model_root, monkeypatch):
    import shutil
    import time

    from merger import hash_cache

    root = model_root / f"hashed-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_root / "llama-base", root)
    hour_ago = time.time() - 3600
    files = sorted(p.name for p in root.iterdir())
    for name in files:
        os.utime(root / name, (hour_ago, hour_ago))
    hashed = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda path: hashed.append(path.name) or real(path))

    first = store.register_directory(root)
    assert sorted(hashed) == files
    hashed.clear()
    assert store.register_directory(root).id == first.id and Store(settings).register_directory(root).id == first.id
    assert hashed == []

    config = root / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))  # changed: new size and mtime
    os.utime(config, (hour_ago + 1, hour_ago + 1))
    changed = store.register_directory(root)
    assert hashed == ["config.json"] and changed.id != first.id
    hashed.clear()
    os.utime(root / "model.safetensors", (hour_ago + 2, hour_ago + 2))  # touched: same bytes, new mtime
    assert store.register_directory(root).id == changed.id and hashed == ["model.safetensors"]
    hashed.clear()
    os.utime(config)  # modified just now: too recent to trust its mtime, hashed every time
    store.register_directory(root)
    store.register_directory(root)
    assert hashed == ["config.json", "config.json"]
    shutil.rmtree(root)
