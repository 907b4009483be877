"""The service end to end: real API and Celery worker processes, on Redis and on the embedded broker."""

import io
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor

import yaml

from merger.hashing import sha256_file
from tests.service_harness import BIN, wait_for

FINAL = ("succeeded", "failed", "cancelled")


def linear(weight: float, family: str = "gemma3") -> str:
    return yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{family}-ft1", "parameters": {"weight": weight}},
        {"model": f"{family}-ft2", "parameters": {"weight": 1 - weight}}]})


SLOW_TIES = yaml.safe_dump({"merge_method": "ties", "base_model": "slow-base", "models": [
    {"model": "slow-ft1", "parameters": {"weight": 0.5, "density": 0.5}},
    {"model": "slow-ft2", "parameters": {"weight": 0.5, "density": 0.5}}]})


def finished(client, job_id: str, seconds: float = 180) -> dict:
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in FINAL and j, seconds, f"job {job_id}", 0.2)


def running_with_progress(client, job_id: str) -> dict:
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j["done"] > 0 and j, 120,
                    f"job {job_id} to make progress", 0.1)


def stored_dirs(service) -> list[str]:
    from pathlib import Path

    home = Path(service.env["MERGER_HOME"])
    return sorted(p.name for p in (home / "models").iterdir()) + sorted(p.name for p in (home / "staging").iterdir())


def test_submit_merge_and_download(service, tmp_path):
    service.start_worker()
    alice = service.client(service.token("alice"))
    assert service.client(None).get("/v1/jobs").status_code == 401

    bad = alice.post("/v1/recipes/validate", json={"recipe": "merge_method: nope\nmodels: [{model: missing}]"})
    assert bad.status_code == 422
    assert {p["loc"] for p in bad.json()["problems"]} == {"stages[0].merge.merge_method", "stages[0].merge.models[0].model"}

    submitted = alice.post("/v1/jobs", json={"recipe": linear(0.3), "name": "e2e"})
    assert submitted.status_code == 202 and submitted.json()["state"] == "queued"
    events = list(_events(alice, submitted.json()["id"]))
    assert events[-1]["state"] == "succeeded"  # (a small job may be over before the stream opens)
    job = finished(alice, submitted.json()["id"])
    model = alice.get(f"/v1/models/{job['model_id']}").json()
    weights = next(f for f in model["files"] if f["path"] == "model.safetensors")

    url = f"/v1/models/{model['id']}/files/model.safetensors"
    head = alice.get(url, headers={"range": "bytes=0-99"})
    assert head.status_code == 206 and len(head.content) == 100
    assert head.headers["content-range"] == f"bytes 0-99/{weights['size']}"
    assert head.headers["etag"] == f'"{weights["sha256"]}"'
    tail = alice.get(url, headers={"range": "bytes=100-"})
    assert tail.status_code == 206 and int(tail.headers["content-length"]) == weights["size"] - 100
    import hashlib

    assert hashlib.sha256(head.content + tail.content).hexdigest() == weights["sha256"]

    pulled = tmp_path / "pulled"
    subprocess.run([str(BIN / "merger"), "pull", model["id"], str(pulled), "--server", service.url,
                    "--token", alice.headers["authorization"].split()[1]], check=True, capture_output=True)
    assert {f["path"]: f["sha256"] for f in model["files"]} == {p.name: sha256_file(p) for p in pulled.iterdir()}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(pulled).config.model_type == "gemma3_text"

    archive = tarfile.open(fileobj=io.BytesIO(alice.get(f"/v1/models/{model['id']}/archive").content))
    members = {m.name.split("/", 1)[1]: archive.extractfile(m).read() for m in archive.getmembers()}
    assert {p: hashlib.sha256(b).hexdigest() for p, b in members.items()} == {f["path"]: f["sha256"] for f in model["files"]}

    again = alice.post("/v1/jobs", json={"recipe": linear(0.3), "name": "e2e"})
    assert again.status_code == 200 and again.json()["state"] == "succeeded" and again.json()["model_id"] == model["id"]
    lineage = alice.get(f"/v1/models/{model['id']}/lineage").json()
    assert sorted(n["name"] for n in lineage["nodes"][1:]) == ["gemma3-ft1", "gemma3-ft2"]


def _events(client, job_id):
    import json

    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def test_cancel_a_running_job(service):
    service.start_worker()
    client = service.client(service.token("carol"))
    job_id = client.post("/v1/jobs", json={"recipe": SLOW_TIES, "name": "to-cancel"}).json()["id"]
    for event in _events(client, job_id):  # the live stream shows the merge advancing
        if event["state"] == "running" and event["done"] > 0:
            assert event["stage"] == "to-cancel" and event["total"] > event["done"]
            break
    client.post(f"/v1/jobs/{job_id}/cancel")
    job = finished(client, job_id)
    assert job["state"] == "cancelled" and job["model_id"] is None
    assert stored_dirs(service) == []  # no model, no leftovers
    assert client.get("/v1/models").json() == []

    next_job = client.post("/v1/jobs", json={"recipe": linear(0.4), "name": "after-cancel"}).json()
    assert finished(client, next_job["id"], 120)["state"] == "succeeded"


def test_worker_killed_mid_merge_runs_the_job_once_more(service):
    first = service.start_worker()
    client = service.client(service.token("dave"))
    job_id = client.post("/v1/jobs", json={"recipe": SLOW_TIES, "name": "survivor"}).json()["id"]
    running_with_progress(client, job_id)
    service.kill(first)  # SIGKILL to the worker and its job process
    service.start_worker()
    job = finished(client, job_id, 300)
    assert job["state"] == "succeeded" and job["attempts"] == 2
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models if m["name"] == "survivor"] == [job["model_id"]]
    assert stored_dirs(service) == [job["model_id"]]  # one model, and nothing half-written


def test_twenty_jobs_from_two_users_stay_private(service):
    service.start_worker()
    service.start_worker()
    users = {name: service.client(service.token(name)) for name in ("alice", "bob")}

    def submit(i: int) -> tuple[str, str]:
        user = "alice" if i % 2 else "bob"
        response = users[user].post("/v1/jobs", json={"recipe": linear(round(0.05 * (i + 1), 2)), "name": f"job{i}"})
        assert response.status_code == 202, response.text
        return user, response.json()["id"]

    with ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(submit, range(20)))
    done = [(user, finished(users[user], job_id, 600)) for user, job_id in jobs]
    assert all(job["state"] == "succeeded" for _, job in done), [j for _, j in done if j["state"] != "succeeded"]

    owned = {user: {job["model_id"] for u, job in done if u == user} for user in users}
    assert len(owned["alice"]) == len(owned["bob"]) == 10
    for user, other in (("alice", "bob"), ("bob", "alice")):
        client = users[user]
        visible = {m["id"] for m in client.get("/v1/models").json()}
        assert owned[user] <= visible and not owned[other] & visible
        foreign = next(iter(owned[other]))
        for path in ("", "/lineage", "/archive", "/files/model.safetensors"):
            assert client.get(f"/v1/models/{foreign}{path}").status_code == 404, path
        foreign_job = next(job["id"] for u, job in done if u == other)
        assert client.get(f"/v1/jobs/{foreign_job}").status_code == 404

    shared = next(iter(owned["alice"]))
    assert users["alice"].post(f"/v1/models/{shared}/visibility", json={"public": True}).json()["public"] is True
    assert users["bob"].get(f"/v1/models/{shared}").status_code == 200


def test_only_owners_change_visibility_and_files_answer_head(service, tmp_path):
    service.start_worker()
    tokens = {u: service.token(u) for u in ("alice", "bob")}
    alice, bob = (service.client(tokens[u]) for u in ("alice", "bob"))
    recipe = tmp_path / "owned.yaml"
    recipe.write_text(linear(0.35))
    submitted = subprocess.run([str(BIN / "merger"), "submit", str(recipe), "--wait", "--server", service.url,
                                "--token", tokens["alice"]], capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr
    model_id = submitted.stdout.strip()
    assert alice.get(f"/v1/models/{model_id}").json()["name"] == "owned"
    head = alice.head(f"/v1/models/{model_id[:12]}/files/config.json")
    assert head.status_code == 200 and head.headers["etag"].strip('"') == head.headers["x-sha256"] and not head.content
    assert alice.post(f"/v1/models/{model_id}/visibility", json={"public": True}).status_code == 200
    assert bob.post(f"/v1/models/{model_id}/visibility", json={"public": False}).status_code == 403
    inputs = [p["id"] for p in alice.get(f"/v1/models/{model_id}").json()["parents"]]
    assert alice.post(f"/v1/models/{inputs[0]}/visibility", json={"public": True}).status_code == 403  # an input, not hers
