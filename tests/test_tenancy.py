"""Tenancy through recipes: two users, alice and bob, on one real `merger serve` and worker (embedded broker). What a
user's recipe, validation, registration or parent list may name is what they may see; everything else is "not
found", said exactly as for something that does not exist. Plus the library-level rules behind it."""

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from merger.access import grant
from merger.db import ModelRow
from merger.errors import MergerError
from merger.references import Resolver, UnresolvedReference
from merger.registry import placeholder_id, register
from merger.service.auth import ensure_user
from merger.settings import Settings
from merger.store import Store
from tests.service_harness import Service, wait_for

FINAL = ("succeeded", "failed", "cancelled")


def with_card(source: Path, dest: Path, card: str) -> Path:
    """A copy of a model directory whose README.md (and so its content id) is its own."""
    shutil.copytree(source, dest)
    (dest / "README.md").write_text(card)
    return dest


def linear(*models: str, weight: float = 0.5) -> dict:
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": weight}} for m in models]}


def finished(client, job_id: str) -> dict:
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in FINAL and j, 300, f"job {job_id}", 0.2)
    assert job["state"] == "succeeded", job
    return job


def problems(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {p["loc"]: p["msg"] for p in response.json()["problems"]}


def said_of(text: str, message: str) -> str:
    """A problem message with the reference it is about taken out: what it tells beyond the caller's own words."""
    assert repr(text) in message, (text, message)
    return message.replace(repr(text), "REF")


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, model_root):
    """The service over a model root of its own (next to the shared one), one worker, and alice's private model."""
    tmp = tmp_path_factory.mktemp("tenancy")
    root = (tmp / "models").resolve()
    root.mkdir()
    dirs = {name: with_card(model_root / source, root / name, f"# {name}\n") for name, source in (
        ("alice-evil", "llama-ft2"), ("bob-evil", "llama-ft1"), ("input", "llama-base"), ("tuned", "llama-ft1"),
        ("secret-base", "llama-base"), ("bob-child", "llama-ft2"), ("private", "gemma3-ft1"))}
    with_card(model_root / "llama-ft1", root / "alice-child", "---\nbase_model: acme/secret-base\n---\n# alice-child\n")
    outside = with_card(model_root / "llama-ft1", tmp / "outside-model", "# outside\n")
    env = {**os.environ, "MERGER_HOME": str(tmp / "home"), "MERGER_MODEL_ROOTS": f"{root}{os.pathsep}{model_root}"}
    env.pop("MERGER_DATABASE_URL", None)
    env.pop("MERGER_BROKER_URL", None)
    (tmp / "logs").mkdir()
    service = Service(env, tmp / "logs")
    try:
        service.start_worker()
        alice, bob = (service.client(service.token(user)) for user in ("alice", "bob"))
        private = alice.post("/v1/models", json={"source": "private", "name": "alice-private"})
        assert private.status_code == 201, private.text
        settings = Settings(home=tmp / "home", model_roots=[root, model_root], database_url=None)
        yield SimpleNamespace(alice=alice, bob=bob, root=root, outside=outside, private=private.json()["id"], dirs=dirs,
                              store=Store(settings))
    finally:
        service.stop()


def unused_prefix(store: Store, start: int) -> str:
    """Eight hex digits that begin no model id in the store."""
    ids = [m.id for m in store.list_models()]
    return next(p for i in range(start, start + 1000) if not any(m.startswith(p := f"{i:08x}") for m in ids))


def test_another_users_private_model_is_not_found_by_id_prefix_id_or_name(tenants):
    secret = tenants.private
    unknown_id = unused_prefix(tenants.store, 0x10000000) + secret[8:]
    pairs = {"prefix": (secret[:8], unused_prefix(tenants.store, 0x20000000)), "id": (secret, unknown_id),
             "name": ("alice-private", "nobody-has-this-name")}
    for kind, (hers, nothing) in pairs.items():
        for route in ("/v1/recipes/validate", "/v1/jobs"):
            [(loc, said)] = problems(tenants.bob.post(route, json={"recipe": linear(hers, weight=1.0)})).items()
            [(_, said_of_nothing)] = problems(tenants.bob.post(route, json={"recipe": linear(nothing, weight=1.0)})).items()
            assert loc == "stages[0].merge.models[0].model"
            assert said_of(hers, said) == said_of(nothing, said_of_nothing), (kind, route)
    assert tenants.bob.get("/v1/jobs").json() == []  # nothing was queued
    assert tenants.alice.post("/v1/recipes/validate", json={"recipe": linear(secret[:8], weight=1.0)}).json()["ok"] is True


def test_validating_many_prefixes_names_every_one_as_not_found(tenants):
    ids = [m.id for m in tenants.store.list_models()]
    prefixes = [tenants.private[:8]] + [p for i in range(0, 2**32, 2**32 // 300)
                                        if not any(m.startswith(p := f"{i:08x}") for m in ids)][:255]
    found = problems(tenants.bob.post("/v1/recipes/validate", json={"recipe": linear(*prefixes, weight=0.1)}))
    assert len(prefixes) == len(found) == 256
    said = {said_of(p, found[f"stages[0].merge.models[{i}].model"]) for i, p in enumerate(prefixes)}
    assert len(said) == 1 and "is not a stage, a stored model, or a directory under the model roots" in said.pop()


def test_a_name_resolves_to_the_callers_own_model_and_inputs_are_served_as_recorded(tenants):
    alice, bob = tenants.alice, tenants.bob
    hers = alice.post("/v1/models", json={"source": "alice-evil", "name": "evilmerge"}).json()["id"]
    his = bob.post("/v1/models", json={"source": "bob-evil", "name": "evilmerge"}).json()["id"]
    assert bob.post(f"/v1/models/{his}/visibility", json={"public": True}).status_code == 200  # newer, and public
    job = finished(alice, alice.post("/v1/jobs", json={"recipe": linear("evilmerge", "input"), "name": "own-first"}).json()["id"])
    parents = {p["name"]: p["id"] for p in alice.get(f"/v1/models/{job['model_id']}").json()["parents"]}
    assert parents["evilmerge"] == hers and his not in parents.values()

    # the input directory, recorded by the run, is served only while it holds the recorded bytes
    config = tenants.root / "input" / "config.json"
    url = f"/v1/models/{parents['input']}/files/config.json"
    served = alice.get(url)
    assert served.status_code == 200 and served.content == config.read_bytes()
    assert alice.get(f"/v1/models/{parents['input']}/archive").status_code == 200
    swapped = tenants.root / "swapped-config.json"
    swapped.write_text(json.dumps({**json.loads(config.read_text()), "swapped": True}))
    config.unlink()
    config.symlink_to(swapped)
    for path in (url, f"/v1/models/{parents['input']}/archive"):
        changed = alice.get(path)
        assert changed.status_code == 409 and "has changed since it was recorded" in changed.json()["detail"], path
        assert b"swapped" not in changed.content
    config.unlink()
    config.symlink_to(tenants.outside / "config.json")  # the same bytes, but outside the roots
    assert alice.get(url).status_code == 409
    with open(tenants.root / "input" / "README.md", "a") as card:  # changed in place
        card.write("more\n")
    assert alice.get(f"/v1/models/{parents['input']}/files/README.md").status_code == 409


def test_a_cache_hit_lets_read_the_result_but_not_own_it(tenants):
    alice, bob = tenants.alice, tenants.bob
    recipe = {"recipe": linear("llama-ft1", "llama-ft2", weight=0.3), "name": "shared-merge"}
    made = finished(alice, alice.post("/v1/jobs", json=recipe).json()["id"])["model_id"]
    hit = bob.post("/v1/jobs", json=recipe)
    assert hit.status_code == 200 and hit.json()["state"] == "succeeded" and hit.json()["model_id"] == made
    assert bob.get(f"/v1/models/{made}").status_code == 200
    assert bob.post(f"/v1/models/{made}/visibility", json={"public": True}).status_code == 403
    assert bob.get("/api/models/bob/shared-merge").status_code == 404  # not his repository: he owns nothing
    forced = finished(bob, bob.post("/v1/jobs", json={**recipe, "force": True}).json()["id"])
    assert forced["model_id"] == made  # recomputed by his job, but stored already: still not his
    assert bob.post(f"/v1/models/{made}/visibility", json={"public": True}).status_code == 403
    assert alice.get("/api/models/alice/shared-merge").json()["sha"] == made[:40]
    assert alice.get(f"/v1/models/{made}").json()["public"] is False


def test_registering_stored_bytes_again_changes_neither_name_nor_owner(tenants):
    alice, bob = tenants.alice, tenants.bob
    first = alice.post("/v1/models", json={"source": "tuned", "name": "alice-tuned"})
    assert first.status_code == 201
    again = bob.post("/v1/models", json={"source": "tuned", "name": "bobs-copy"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"] and again.json()["name"] == "alice-tuned"
    assert alice.get("/api/models/alice/alice-tuned").json()["sha"] == first.json()["id"][:40]
    assert bob.post(f"/v1/models/{first.json()['id']}/visibility", json={"public": True}).status_code == 403
    assert bob.get(f"/v1/models/{first.json()['id']}").status_code == 200  # he brought the bytes: he may read them


def test_placeholders_are_their_registrants_own(tenants):
    alice, bob = tenants.alice, tenants.bob
    child = alice.post("/v1/models", json={"source": "alice-child", "name": "alice-child"}).json()
    mine = placeholder_id("acme/secret-base", "alice")
    assert [(p["id"], p["kind"]) for p in child["parents"]] == [(mine, "placeholder")]
    lineage = alice.get(f"/v1/models/{child['id']}/lineage").json()

    his = bob.post("/v1/models", json={"source": "secret-base", "name": "acme/secret-base"})
    assert his.status_code == 201 and his.json()["parents"] == []
    assert alice.get(f"/v1/models/{child['id']}/lineage").json() == lineage
    assert bob.get(f"/v1/models/{mine}").status_code == 404

    # alice registering those bytes under that name fills her own placeholder
    filled = alice.post("/v1/models", json={"source": "secret-base", "name": "acme/secret-base"})
    assert filled.status_code == 200 and filled.json()["id"] == his.json()["id"]
    assert [p["id"] for p in alice.get(f"/v1/models/{child['id']}").json()["parents"]] == [his.json()["id"]]


def test_a_parent_list_shows_nothing_of_a_model_the_caller_may_not_see(tenants):
    secret = tenants.private
    labels = ["alice-private", secret, secret[:10]]
    made = tenants.bob.post("/v1/models", json={"source": "bob-child", "name": "bob-child", "parents": labels})
    assert made.status_code == 201, made.text
    assert [(p["id"], p["name"], p["kind"]) for p in made.json()["parents"]] == [
        (placeholder_id(label, "bob"), label, "placeholder") for label in labels]
    lineage = tenants.bob.get(f"/v1/models/{made.json()['id']}/lineage").json()
    assert [(n["id"], n["hidden"]) for n in lineage["nodes"]] == [
        (made.json()["id"], False), *((placeholder_id(label, "bob"), False) for label in labels)]


def test_paths_outside_the_roots_all_get_the_same_answer(tenants):
    refs = ["/etc/shadow", "/root/.ssh", "/etc", "/no/such/path", str(tenants.outside), "../" * 12 + "etc/passwd",
            "/" + "a" * 5000, "a" * 300, "bad\x01name\x7f", "\u043c\u043e\u0434\u0435\u043b\u044c/\u00fc\u2028x"]
    found = problems(tenants.bob.post("/v1/recipes/validate", json={"recipe": linear(*refs)}))
    said = {said_of(ref, found[f"stages[0].merge.models[{i}].model"]) for i, ref in enumerate(refs)}
    assert len(found) == len(refs) and len(said) == 1, said
    refused = tenants.bob.post("/v1/models", json={"source": "/etc", "name": "etc"})
    assert refused.status_code == 400 and said_of("/etc", refused.json()["detail"]) == said.pop()


# --- the library ----------------------------------------------------------------------------------------------------


def add_rows(store: Store, *rows: tuple[str, str, int, dict[str, bool], bool]) -> None:
    """(id, name, minutes after a fixed time, {user: owner?}, public) rows without files: what ``find`` looks at."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with store.session.begin() as s:
        for model_id, name, minutes, grants, public in rows:
            s.add(ModelRow(id=model_id, name=name, size_bytes=0, created_at=start + timedelta(minutes=minutes), public=public))
            s.flush()
            for user, owner in grants.items():
                ensure_user(s, user)
                grant(s, [model_id], user, owner=owner)


def test_find_sees_what_the_viewer_may_see_their_own_first(store):
    own, granted, public, newest = "1" * 64, "2" * 64, "3" * 63 + "0", "3" * 63 + "1"
    add_rows(store, (own, "same", 0, {"alice": True}, False), (granted, "same", 1, {"alice": False}, False),
             (public, "same", 2, {"bob": True}, True), (newest, "same", 3, {"bob": True}, False))
    assert store.find("same", viewer="alice").id == own  # the oldest, but hers
    assert store.find("same", viewer="carol").id == public  # neither owned nor granted: the public one
    assert store.find("same").id == newest  # the local command line sees the whole store
    assert store.find("same", viewer="bob").id == newest
    assert store.find(newest, viewer="alice") is None and store.find(granted[:8], viewer="bob") is None
    assert store.find(newest[:8], viewer="alice").id == public  # bob's private one does not make the prefix ambiguous
    for viewer in ("bob", None):
        with pytest.raises(MergerError, match="ambiguous id prefix"):
            store.find(newest[:8], viewer=viewer)


def test_unprintable_overlong_and_outside_references_are_one_clean_problem(settings, store, tmp_path):
    (tmp_path / "exists.txt").write_text("x")
    resolver = Resolver(settings, store, viewer="bob")
    refs = ["nothing-here", str(tmp_path), str(tmp_path / "exists.txt"), "/etc/shadow", "/" + "a" * 5000, "a" * 5000,
            "nul\x00byte", "lone\ud800surrogate", "~no-such-user-here/x", "line\nbreak", "../" * 40]
    said = set()
    for ref in refs:
        with pytest.raises(UnresolvedReference) as caught:
            resolver.resolve(ref)
        said.add(said_of(ref, str(caught.value)))
        with pytest.raises(UnresolvedReference):
            resolver.confine(ref)
    assert len(said) == 1, said


def stored(settings, store, source: str, name: str, owner: str, *, public: bool) -> ModelRow:
    """``source`` registered by ``owner`` as ``name``."""
    model = register(settings, store, source, name=name, viewer=owner).model
    with store.session.begin() as s:
        ensure_user(s, owner)
        grant(s, [model.id], owner, owner=True)
        s.get(ModelRow, model.id).public = public
    return model


def test_a_job_resolves_as_its_owner_again_when_it_runs(settings, store):
    from merger.service.jobs import Jobs

    carols = stored(settings, store, "llama-ft1", "shared-name", "carol", public=True)
    carols_other = stored(settings, store, "gemma3-base", "carols-other", "carol", public=True)
    jobs = Jobs(settings, store, lambda _job_id, _queue: None)
    kept = jobs.submit("alice", linear("shared-name", "llama-base"), name="kept")
    lost = jobs.submit("alice", linear("carols-other", "gemma3-ft1"), name="lost")
    assert kept.state == lost.state == "queued"
    daves = stored(settings, store, "llama-ft2", "shared-name", "dave", public=True)  # newer, public, same name
    jobs.execute(kept.id)
    ran = jobs.get(kept.id)
    assert ran.state == "succeeded", ran.error_message
    assert [e.parent_id for e in store.get(ran.model_id).parents][0] == carols.id != daves.id

    with store.session.begin() as s:
        s.get(ModelRow, carols_other.id).public = False  # alice may no longer see it
    jobs.execute(lost.id)
    failed = jobs.get(lost.id)
    assert failed.state == "failed" and failed.error_code == "invalid_recipe"
    assert "'carols-other' is not a stage, a stored model" in failed.error_message


def test_a_job_grants_its_inputs_and_nothing_further_up(settings, store):
    from merger.access import can_see
    from merger.service.jobs import Jobs

    jobs = Jobs(settings, store, lambda _job_id, _queue: None)

    def run(user: str, recipe: dict, name: str) -> ModelRow:
        job = jobs.submit(user, recipe, name=name)
        jobs.execute(job.id)
        done = jobs.get(job.id)
        assert done.state == "succeeded", done.error_message
        return store.get(done.model_id)

    carols = run("carol", linear("llama-ft1", "llama-ft2"), "carol-merge")
    with store.session.begin() as s:
        s.get(ModelRow, carols.id).public = True
    alices = run("alice", linear("carol-merge", "llama-base"), "alice-merge")
    with store.session() as s:
        assert can_see(s, carols.id, "alice") and can_see(s, alices.id, "alice")
        assert [can_see(s, edge.parent_id, "alice") for edge in alices.parents] == [True, True]  # what she named
        assert not any(can_see(s, edge.parent_id, "alice") for edge in carols.parents)  # what carol's was made from
        assert all(can_see(s, edge.parent_id, "carol") for edge in carols.parents)
