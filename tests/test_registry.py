"""Registering community models: placeholders filled out of order, graph queries (library, CLI, API),
recipes over registered models, rebuilds, and refusals."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from merger import graph
from merger.errors import MergerError
from merger.hashing import manifest, manifest_id, sha256_file
from merger.orchestrator import check_recipe, rebuild, run_recipe
from merger.registry import placeholder_id, register
from merger.settings import Settings
from merger.store import Store
from tests.tiny_models import make_lora

BASE, LORA, TUNED, MERGED = "tiny-org/llama-base", "tiny-org/llama-lora", "tiny-org/llama-tuned", "tiny-org/llama-merged"
COMMIT = "c0ffee" + "0" * 34
MERGER = str(Path(sys.executable).parent / "merger")


@dataclass(frozen=True)
class Community:
    root: Path  # a model root of downloaded-looking models whose cards name Hub ids
    hf_cache: Path  # a local Hugging Face cache holding BASE


def with_card(source: Path, dest: Path, front: dict) -> Path:
    shutil.copytree(source, dest)
    (dest / "README.md").write_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {dest.name}\n")
    return dest


def cache_repo(cache: Path, repo_id: str, files: Path) -> Path:
    """``files`` laid out as the Hub client caches a repo: snapshot symlinks into blobs, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in files.iterdir():
        blob = repo / "blobs" / sha256_file(f)
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def community(tmp_path_factory, model_root) -> Community:
    root = tmp_path_factory.mktemp("community")
    with_card(model_root / "llama-ft2", root / "llama-merged", {"base_model": [TUNED, BASE], "tags": ["merge"]})
    with_card(model_root / "llama-ft1", root / "llama-tuned", {"base_model": BASE, "base_model_relation": "finetune"})
    make_lora(model_root / "llama-base", root / "llama-lora", seed=7)
    (root / "llama-lora" / "README.md").unlink()  # no card: the parent comes from adapter_config.json
    config = root / "llama-lora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": BASE}))
    hf_cache = tmp_path_factory.mktemp("hf-cache")
    cache_repo(hf_cache, BASE, model_root / "llama-base")
    return Community(root, hf_cache)


@pytest.fixture
def env(community, model_root, tmp_path, monkeypatch) -> tuple[Settings, Store]:
    monkeypatch.setenv("MERGER_HOME", str(tmp_path / "home"))
    # the community root first: other tests add their own models (a "llama-lora" too) to the shared model_root
    monkeypatch.setenv("MERGER_MODEL_ROOTS", f"{community.root}{os.pathsep}{model_root}")
    monkeypatch.setenv("MERGER_HF_CACHE_DIR", str(community.hf_cache))
    monkeypatch.delenv("MERGER_DATABASE_URL", raising=False)
    settings = Settings()
    return settings, Store(settings)


def register_chain(settings, store) -> dict[str, str]:
    """The four models, children first; returns name -> id."""
    for source, name in (("llama-merged", MERGED), ("llama-lora", LORA), ("llama-tuned", TUNED), (BASE, BASE)):
        register(settings, store, source, name=name)
    return {m.name: m.id for m in store.list_models()}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([MERGER, *args], capture_output=True, text=True)
    assert not check or result.returncode == 0, result.stderr
    return result


def edges_of(store, model_id: str) -> list[tuple[str, str, str]]:
    return [(e.parent_id, e.relation, e.role) for e in store.get(model_id).parents]


def placeholders(store) -> list[str]:
    return [m.name for m in store.list_models() if m.kind == "placeholder"]


# --- registering out of order -----------------------------------------------------------------------------


def test_registered_out_of_order_placeholders_are_filled(env, community):
    settings, store = env
    merged = register(settings, store, "llama-merged", name=MERGED)
    assert merged.created and merged.model.kind == "model"
    assert merged.model.id == manifest_id(manifest(community.root / "llama-merged"))  # its own files, untouched
    assert merged.model.origin == {"source": str(community.root / "llama-merged")}
    assert [(p.label, p.relation, p.role, p.placeholder) for p in merged.parents] == [
        (TUNED, "merge", "donor", True), (BASE, "merge", "donor", True)]  # two base models: merge, inferred
    assert edges_of(store, merged.model.id) == [(placeholder_id(TUNED), "merge", "donor"), (placeholder_id(BASE), "merge", "donor")]
    assert sorted(placeholders(store)) == [BASE, TUNED]
    tree = graph.ancestors(store, merged.model.id)
    p_tuned, p_base, m = (f"m{i[:12]}" for i in (placeholder_id(TUNED), placeholder_id(BASE), merged.model.id))
    assert graph.to_mermaid(tree).splitlines() == [
        "graph TD",
        f'    {m}["{MERGED} ({merged.model.id[:12]}, model)"]',
        f'    {p_tuned}["{TUNED} ({placeholder_id(TUNED)[:12]}, placeholder)"]',
        f'    {p_base}["{BASE} ({placeholder_id(BASE)[:12]}, placeholder)"]',
        f'    {p_tuned} -->|"merge/donor"| {m}',
        f'    {p_base} -->|"merge/donor"| {m}',
        "    classDef placeholder stroke-dasharray: 4 4",
        f"    class {p_tuned},{p_base} placeholder",
    ]

    adapter = register(settings, store, "llama-lora", name=LORA)
    assert adapter.model.kind == "adapter"
    assert [(p.label, p.model_id, p.relation, p.role) for p in adapter.parents] == [(BASE, placeholder_id(BASE), "adapter", "base")]

    tuned = register(settings, store, "llama-tuned", name=TUNED)
    assert tuned.filled == [TUNED] and store.get(placeholder_id(TUNED)) is None
    assert edges_of(store, merged.model.id) == [(tuned.model.id, "merge", "donor"), (placeholder_id(BASE), "merge", "donor")]
    assert placeholders(store) == [BASE]

    registered = json.loads(cli("register", BASE, "--name", BASE, "--json").stdout)  # from the local Hugging Face cache
    assert registered["created"] and registered["filled"] == [BASE] and registered["parents"] == []
    assert registered["origin"] == {"hub_id": BASE, "revision": None, "commit": COMMIT, "source": registered["origin"]["source"]}
    base = registered["id"]
    assert placeholders(store) == [] and store.get(placeholder_id(BASE)) is None
    for child in (merged.model.id, adapter.model.id, tuned.model.id):
        assert base in [parent for parent, _, _ in edges_of(store, child)]
    assert set(graph.descendants(store, base).nodes) == {base, merged.model.id, adapter.model.id, tuned.model.id}

    again = register(settings, store, "llama-tuned", name=TUNED)
    assert not again.created and again.model.id == tuned.model.id and len(store.list_models()) == 4


def test_model_tree_as_mermaid(env):
    settings, store = env
    ids = register_chain(settings, store)
    node = {name: f"m{model_id[:12]}" for name, model_id in ids.items()}
    label = {name: f"{name} ({model_id[:12]}, {'adapter' if name == LORA else 'model'})" for name, model_id in ids.items()}
    expected = [
        "graph TD",
        f'    {node[BASE]}["{label[BASE]}"]',
        f'    {node[MERGED]}["{label[MERGED]}"]',  # children in the order they were registered
        f'    {node[LORA]}["{label[LORA]}"]',
        f'    {node[TUNED]}["{label[TUNED]}"]',
        f'    {node[BASE]} -->|"merge/donor"| {node[MERGED]}',
        f'    {node[BASE]} -->|"adapter/base"| {node[LORA]}',
        f'    {node[BASE]} -->|"finetune/base"| {node[TUNED]}',
        f'    {node[TUNED]} -->|"merge/donor"| {node[MERGED]}',
    ]
    assert graph.to_mermaid(graph.descendants(store, ids[BASE])).splitlines() == expected
    assert cli("lineage", BASE, "--descendants", "--format", "mermaid").stdout.splitlines() == expected


# --- graph queries ------------------------------------------------------------------------------------------


def test_ancestors_descendants_and_paths(env):
    settings, store = env
    ids = register_chain(settings, store)
    base, lora, tuned, merged = (ids[n] for n in (BASE, LORA, TUNED, MERGED))

    up = graph.ancestors(store, merged)
    assert list(up.nodes) == [merged, tuned, base]
    assert [(e.child, e.parent, e.relation, e.role) for e in up.edges] == [
        (merged, tuned, "merge", "donor"), (merged, base, "merge", "donor"), (tuned, base, "finetune", "base")]
    assert up.nodes[merged].inputs == (tuned, base) and up.nodes[base].hub_id == BASE
    assert list(graph.descendants(store, lora).nodes) == [lora]

    path = graph.between(store, merged, base)
    assert (path.direction, set(path.nodes), len(path.edges)) == ("ancestors", {merged, tuned, base}, 3)
    down = graph.between(store, base, lora)
    assert (down.direction, list(down.nodes), [(e.child, e.parent) for e in down.edges]) == ("descendants", [base, lora], [(lora, base)])
    with pytest.raises(graph.NoPath, match="neither descends from the other"):
        graph.between(store, lora, tuned)

    shown = json.loads(cli("lineage", MERGED, "--to", BASE, "--json").stdout)
    assert shown == graph.to_json(path)
    assert shown["edges"][0] == {"child": merged, "parent": tuned, "relation": "merge", "role": "donor", "weight": None,
                                 "position": 0, "recipe_digest": None, "ref": TUNED, "loc": None}
    tree = cli("lineage", BASE, "--descendants").stdout
    assert all(name in tree for name in ids) and "adapter/base" in tree
    assert cli("lineage", MERGED).stdout.count(BASE) == 2  # the default: the ancestor tree (base reached twice)
    dot = cli("lineage", LORA, "--format", "dot").stdout
    assert f'"{base}" -> "{lora}" [label="adapter/base"];' in dot
    unrelated = cli("lineage", LORA, "--to", TUNED, check=False)
    assert unrelated.returncode == 1 and "no lineage path" in unrelated.stderr


def test_api_registers_and_answers_lineage_within_visibility(env):
    from fastapi.testclient import TestClient

    from merger.service.api import create_app
    from merger.service.auth import create_token

    settings, store = env
    with store.session.begin() as s:
        tokens = {user: create_token(s, user) for user in ("alice", "bob")}
    app = create_app(settings)
    alice, bob = (TestClient(app, headers={"authorization": f"Bearer {tokens[u]}"}) for u in ("alice", "bob"))

    first = alice.post("/v1/models", json={"source": "llama-merged", "name": MERGED})
    assert first.status_code == 201, first.text
    assert [(p["name"], p["kind"]) for p in first.json()["parents"]] == [(TUNED, "placeholder"), (BASE, "placeholder")]
    base = alice.post("/v1/models", json={"source": BASE, "name": BASE}).json()
    assert base["origin"]["hub_id"] == BASE and base["origin"]["commit"] == COMMIT
    tuned = alice.post("/v1/models", json={"source": "llama-tuned", "name": TUNED}).json()
    assert alice.post("/v1/models", json={"source": "llama-tuned", "name": TUNED}).status_code == 200  # already there
    merged = first.json()["id"]

    up = alice.get(f"/v1/models/{merged}/lineage").json()
    assert [n["id"] for n in up["nodes"]] == [merged, tuned["id"], base["id"]] and up["direction"] == "ancestors"
    assert up == graph.to_json(graph.ancestors(store, merged))
    mermaid = alice.get(f"/v1/models/{merged[:10]}/lineage", params={"format": "mermaid"})
    assert mermaid.headers["content-type"].startswith("text/plain") and mermaid.text == graph.to_mermaid(graph.ancestors(store, merged))
    assert alice.get(f"/v1/models/{merged}/lineage", params={"format": "dot"}).headers["content-type"].startswith("text/vnd.graphviz")
    path = alice.get(f"/v1/models/{merged}/lineage", params={"to": base["id"]}).json()
    assert {n["id"] for n in path["nodes"]} == {merged, tuned["id"], base["id"]}
    assert alice.get(f"/v1/models/{merged}/lineage", params={"to": base["id"], "direction": "ancestors"}).status_code == 422

    assert bob.get(f"/v1/models/{merged}/lineage").status_code == 404  # alice's, private
    lora = bob.post("/v1/models", json={"source": "llama-lora", "name": LORA}).json()
    # alice's base is private: to bob its Hub id is a label like any unknown one, so he gets his own placeholder
    assert [(p["id"], p["name"], p["kind"]) for p in lora["parents"]] == [(placeholder_id(BASE, "bob"), BASE, "placeholder")]
    down = alice.get(f"/v1/models/{base['id']}/lineage", params={"direction": "descendants"}).json()
    assert {n["id"] for n in down["nodes"]} == {base["id"], tuned["id"], merged}  # bob's adapter is not hers to see

    alice.post(f"/v1/models/{merged}/visibility", json={"public": True})
    seen_by_bob = bob.get(f"/v1/models/{merged}/lineage").json()
    assert seen_by_bob["nodes"][1] == {"id": tuned["id"], "name": None, "kind": None, "hub_id": None, "recipe_digest": None,
                                       "inputs": [], "hidden": True}
    assert [(p["id"], p["name"], p["kind"]) for p in bob.get(f"/v1/models/{merged}").json()["parents"]] == [
        (tuned["id"], None, "hidden"), (base["id"], None, "hidden")]
    assert bob.get(f"/v1/models/{merged}/lineage", params={"to": base["id"]}).status_code == 404
    alice.post(f"/v1/models/{base['id']}/visibility", json={"public": True})
    assert [n["name"] for n in bob.get(f"/v1/models/{merged}/lineage").json()["nodes"]] == [MERGED, None, BASE]
    refused = bob.post("/v1/models", json={"source": "/etc", "name": "etc"})
    assert refused.status_code == 400 and "outside the model roots" in refused.json()["detail"]
    assert bob.post("/v1/models", json={"source": "llama-tuned", "name": "x", "relation": "distilled"}).status_code == 422


# --- recipes over registered models, and rebuilds ------------------------------------------------------------


def run(recipe: dict, settings, store):
    return run_recipe(check_recipe(recipe, settings, store, default_name="r"), settings, store)


FOLD_AND_MERGE = {"stages": [
    {"name": "folded", "adapters": {"base": BASE, "mode": "fold", "adapters": [{"path": LORA}]}},
    {"name": "blend", "merge": {"merge_method": "linear", "models": [
        {"model": "folded", "parameters": {"weight": 0.5}}, {"model": TUNED, "parameters": {"weight": 0.5}}]}},
]}


def test_recipe_chain_over_registered_models_rebuilds_byte_identical(env):
    settings, store = env
    ids = register_chain(settings, store)
    folded, blend = run(FOLD_AND_MERGE, settings, store)
    assert edges_of(store, folded.model.id) == [(ids[BASE], "adapter", "base"), (ids[LORA], "adapter", "adapter")]
    connected = graph.descendants(store, ids[BASE]).nodes
    assert set(connected) == set(ids.values()) | {folded.model.id, blend.model.id}  # one graph: registered and made

    card = (store.path_of(blend.model) / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["folded", TUNED] and front["base_model_relation"] == "merge"
    assert blend.model.recipe_digest in card and folded.model.id in card and ids[TUNED] in card
    folded_card = yaml.safe_load((store.path_of(folded.model) / "README.md").read_text().split("---\n")[1])
    assert folded_card["base_model"] == [BASE] and folded_card["base_model_relation"] == "finetune"

    run({"stages": [{"name": "folded", "adapters": {"base": BASE, "mode": "fold", "adapters": [{"path": LORA, "weight": 0.5}]}}]},
        settings, store)
    assert store.find("folded").id != folded.model.id  # the name now means another model
    before = [(m.id, m.name) for m in store.list_models()]
    for made in (folded, blend):
        result = rebuild(made.model, settings, store)
        assert result.identical and result.rebuilt_id == made.model.id and result.differences == []
    assert [(m.id, m.name) for m in store.list_models()] == before and list(settings.staging_dir.iterdir()) == []
    shown = cli("rebuild", blend.model.id[:10])
    assert shown.stdout.startswith(f"identical: blend {blend.model.id}")


def test_rebuild_reports_a_mismatch(env, monkeypatch):
    from typer.testing import CliRunner

    from merger import orchestrator
    from merger.cli import app

    settings, store = env
    [made] = run({"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 0.3}},
                                                       {"model": "llama-ft2", "parameters": {"weight": 0.7}}]}, settings, store)
    recorded = orchestrator.software_versions()
    monkeypatch.setattr(orchestrator, "software_versions", lambda: {**recorded, "torch": "0.0-other"})
    result = rebuild(made.model, settings, store)
    assert not result.identical and result.version_changes == {"torch": (recorded["torch"], "0.0-other")}
    assert [line.split(":")[0] for line in result.differences] == ["README.md"]  # the card names the versions
    shown = CliRunner().invoke(app, ["rebuild", made.model.id])
    assert shown.exit_code == 1 and f"MISMATCH: r {made.model.id}" in shown.output and "README.md: sha256" in shown.output


def test_rebuild_names_an_input_that_is_gone(env, community, model_root):
    settings, store = env
    gone = community.root / f"ephemeral-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_root / "llama-ft2", gone)
    [made] = run({"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 0.5}},
                                                       {"model": gone.name, "parameters": {"weight": 0.5}}]}, settings, store)
    shutil.rmtree(gone)
    with pytest.raises(MergerError) as caught:
        rebuild(made.model, settings, store)
    assert f"stages[0].merge.models[1].model: '{gone.name}'" in str(caught.value) and "is gone" in str(caught.value)
    failed = cli("rebuild", made.model.id, check=False)
    assert failed.returncode == 1 and gone.name in failed.stderr and "Traceback" not in failed.stderr

    lora = register(settings, store, "llama-lora", name=LORA).model
    with pytest.raises(MergerError, match="was not built by a merger stage"):
        rebuild(lora, settings, store)


# --- refusals -----------------------------------------------------------------------------------------------


def test_refusals_name_the_file(env, community, model_root, tmp_path):
    settings, store = env
    tag = uuid.uuid4().hex[:6]
    pickled = community.root / f"pickled-{tag}"
    pickled.mkdir()
    shutil.copy(model_root / "llama-ft1" / "config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    remote = community.root / f"remote-{tag}"
    shutil.copytree(model_root / "llama-ft1", remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    outside = shutil.copytree(model_root / "llama-ft1", tmp_path / "outside")
    linked = shutil.copytree(model_root / "llama-ft1", community.root / f"linked-{tag}")
    (tmp_path / "secret.txt").write_text("secret")
    (linked / "notes.txt").symlink_to(tmp_path / "secret.txt")
    bad_relation = with_card(model_root / "llama-ft1", community.root / f"distilled-{tag}", {"base_model": BASE, "base_model_relation": "distilled"})
    bad_base = with_card(model_root / "llama-ft1", community.root / f"numbered-{tag}", {"base_model": 3})

    expected = {
        pickled.name: "pytorch_model.bin",
        remote.name: "auto_map in config.json",
        str(outside): "outside the model roots",
        linked.name: "notes.txt links to",
        bad_relation.name: "README.md: base_model_relation 'distilled' is not one of adapter, merge, quantized, finetune",
        bad_base.name: "README.md: base_model must be a Hub id or a list of them, not 3",
        "tiny-org/not-cached": "not in the local Hugging Face cache",
    }
    for source, fragment in expected.items():
        with pytest.raises(MergerError) as caught:
            register(settings, store, source, name="x")
        assert fragment in str(caught.value), (source, str(caught.value))
    assert store.list_models() == [] and list(settings.staging_dir.iterdir()) == []
    with pytest.raises(MergerError, match="--relation 'distilled' is not one of"):
        register(settings, store, "llama-tuned", name="x", relation="distilled")
    refused = cli("register", str(outside), "--name", "x", check=False)
    assert refused.returncode == 1 and "outside the model roots" in refused.stderr
