"""Faults lose nothing and run nothing twice: a broker restarted empty, a lost message, an outcome the
database refuses, and `merger serve` stopped by a signal."""

import os
import re
import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
import redis
import yaml

from merger.db import JobRow
from merger.service.jobs import Jobs
from merger.service.leases import LeaseKeeper
from merger.settings import Settings
from merger.store import Store
from tests.service_harness import BIN, Service, free_port, restart_redis_empty, start_private_redis, wait_for
from tests.test_service import SLOW_TIES, finished, linear, running_with_progress
from tests.test_store_and_cache import postgres_url  # noqa: F401 - a fixture

RUN_LOG = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]+\] job (\w+): run (started|ended)", re.M)


@pytest.fixture(scope="module")
def broker_service(tmp_path_factory, model_root, slow_models):
    """The API on a private redis-server that tests may kill; no worker until a test starts one."""
    tmp = tmp_path_factory.mktemp("faults")
    url, redis_proc = start_private_redis(tmp)
    env = {**os.environ, "MERGER_HOME": str(tmp / "home"), "MERGER_MODEL_ROOTS": str(model_root), "MERGER_BROKER_URL": url,
           "MERGER_LEASE_SECONDS": "3", "MERGER_REAPER_INTERVAL": "1", "MERGER_QUEUED_TIMEOUT": "4"}
    env.pop("MERGER_DATABASE_URL", None)
    (tmp / "logs").mkdir()
    svc = Service(env, tmp / "logs")
    svc.redis = redis_proc
    yield svc
    svc.stop()
    svc.redis.kill()
    svc.redis.wait()


def test_a_lost_message_is_sent_again(broker_service):
    client = broker_service.client(broker_service.token("erin"))
    job_id = client.post("/v1/jobs", json={"recipe": linear(0.45), "name": "lost"}).json()["id"]
    redis.Redis.from_url(broker_service.env["MERGER_BROKER_URL"]).flushall()  # the broker loses the message
    broker_service.start_worker()
    job = finished(client, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 1


def test_redis_restarted_empty_mid_job_runs_it_once_at_a_time(broker_service):
    broker_service.start_worker()  # two workers: the re-enqueued job may go to either
    client = broker_service.client(broker_service.token("frank"))
    job_id = client.post("/v1/jobs", json={"recipe": SLOW_TIES, "name": "broker-restart"}).json()["id"]
    running_with_progress(client, job_id)
    logs = list(broker_service.logs.glob("worker-*.log"))
    noticed = lambda: any("lease lost; stopping the job" in log.read_text() for log in logs)  # noqa: E731
    broker_service.redis = restart_redis_empty(broker_service.redis, broker_service.env["MERGER_BROKER_URL"],
                                               while_down=lambda: wait_for(noticed, 60, "the worker to lose the lease"))
    job = finished(client, job_id, 300)
    assert job["state"] == "succeeded" and job["attempts"] == 2, job

    runs = []  # (started, ended) of each run, from every worker's log
    for log in broker_service.logs.glob("worker-*.log"):
        started = None
        for moment, job, what in RUN_LOG.findall(log.read_text()):
            if job == job_id and what == "started":
                started = datetime.strptime(moment, "%Y-%m-%d %H:%M:%S,%f")
            elif job == job_id:
                runs.append((started, datetime.strptime(moment, "%Y-%m-%d %H:%M:%S,%f")))
    runs.sort()
    assert len(runs) == 2
    assert runs[0][1] <= runs[1][0], f"the second run started before the first stopped: {runs}"


@pytest.fixture
def private_root(tmp_path, model_root) -> Path:
    root = tmp_path / "models"
    for name in ("gemma3-ft1", "gemma3-ft2"):
        shutil.copytree(model_root / name, root / name)
    return root


def test_a_failure_postgresql_refuses_is_recorded(tmp_path, private_root, postgres_url, monkeypatch):  # noqa: F811
    """The failure message holds NUL (read from a model's config): the job still ends failed, once."""
    monkeypatch.setenv("MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGER_MODEL_ROOTS", str(private_root))
    monkeypatch.setenv("MERGER_DATABASE_URL", postgres_url)
    monkeypatch.delenv("MERGER_BROKER_URL", raising=False)
    settings = Settings()
    store = Store(settings)
    sent = []
    jobs = Jobs(settings, store, lambda job_id, queue: sent.append(job_id))
    job = jobs.submit("gina", yaml.safe_load(linear(0.5)), name="nul")
    config = private_root / "gemma3-ft2" / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"Gemma3ForCausalLM"', '"Gemma3\\u0000Evil"'))  # after validation

    jobs.execute(job.id)
    failed = jobs.get(job.id)
    assert failed.state == "failed" and failed.error_code == "invalid_recipe", failed.error_message
    assert "architecture Gemma3\\x00Evil differs" in failed.error_message
    assert jobs.reap() == [] and jobs.get(job.id).state == "failed" and sent == [job.id]
    assert jobs.cancel(job.id).state == "failed"  # a final state stays

    # a running job whose worker vanished, with a cancel asked for, ends cancelled (not queued again)
    config.write_text(original)
    jobs.submit("gina", yaml.safe_load(linear(0.6)), name="vanished")
    vanished = sent[-1]
    with store.session.begin() as s:
        s.get(JobRow, vanished).state, s.get(JobRow, vanished).worker = "running", "a-dead-worker"
    assert jobs.cancel(vanished).state == "running"
    settings.lease_seconds = 0  # the reaper acts as soon as it sees the lease free
    assert jobs.reap() == [] and jobs.get(vanished).state == "cancelled"

    # an outcome the database refuses outright (a model id it does not know) still ends the job, as failed
    refused = jobs.submit("gina", yaml.safe_load(linear(0.7)), name="refused").id
    keeper = LeaseKeeper(jobs.leases, refused, 30)
    with store.session.begin() as s:
        s.get(JobRow, refused).state, s.get(JobRow, refused).worker = "running", keeper.holder
    jobs._finish(refused, keeper, "succeeded", model_id="f" * 64)
    assert (jobs.get(refused).state, jobs.get(refused).error_code) == ("failed", "internal_error")
    store.session.kw["bind"].dispose()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_local_worker(tmp_path, model_root, sig):
    env = {**os.environ, "MERGER_HOME": str(tmp_path / "home"), "MERGER_MODEL_ROOTS": str(model_root)}
    for name in ("MERGER_DATABASE_URL", "MERGER_BROKER_URL"):
        env.pop(name, None)
    log, port = tmp_path / "serve.log", free_port()
    serve = subprocess.Popen([str(BIN / "merger"), "serve", "--port", str(port)], env=env, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT)
    wait_for(lambda: api_answers(f"http://127.0.0.1:{port}") or serve.poll() is not None, 120, "the API")
    family = psutil.Process(serve.pid).children(recursive=True)
    assert [p.cmdline()[-1] for p in family] == ["worker"], "serve started no local worker"
    serve.send_signal(sig)
    assert serve.wait(120) == 0, log.read_text()[-2000:]
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert alive == [], [p.cmdline() for p in alive]


def api_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
