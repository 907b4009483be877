"""Benchmark the merge service on Redis: real API and Celery worker processes, tiny Gemma 3 models.

One command, from the repo root:

    .venv/bin/python benchmarks/service.py [--sequential 10] [--jobs 20] [--out FILE]

Every phase gets a fresh service (its own MERGER_HOME in a temp dir, Redis DB 12 flushed before and
after), and its jobs are linear merges of gemma3-ft1/ft2 with distinct weights, so none is a cache hit.

1. latency: one worker; jobs submitted one at a time, each 6 s after the previous one finished (Celery
   may take until its 5 s pool tick to replace the per-job process, so the worker is idle and ready).
   Server latency is started_at - created_at from the job record; client latency is from POST
   returning to first polling a state other than "queued" (every 5 ms). A warm-up job is not counted.
2. throughput: all jobs submitted at once (one thread each), with 1 worker, then with 2 workers.
   Throughput is jobs / (last finished_at - first created_at); run time is finished_at - started_at.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import redis
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the tests package holds the process harness

from tests.service_harness import Service, redis_answers, wait_for  # noqa: E402
from tests.tiny_models import make_family  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"
FINAL = ("succeeded", "failed", "cancelled")
IDLE_PAUSE = 6.0  # seconds between sequential jobs (see the docstring)
STALL = 120  # seconds to wait on any one job: a stuck worker fails the run instead of hanging it
console = Console()


def linear(weight: float) -> str:
    return yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "gemma3-ft1", "parameters": {"weight": weight}},
        {"model": "gemma3-ft2", "parameters": {"weight": round(1 - weight, 6)}}]})


def weights(n: int) -> list[float]:
    return [round((i + 1) / (n + 1), 6) for i in range(n)]


def between(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def submit(client: httpx.Client, weight: float) -> str:
    response = client.post("/v1/jobs", json={"recipe": linear(weight), "name": f"bench-{weight}"})
    if response.status_code != 202:
        sys.exit(f"submit answered {response.status_code}: {response.text}")
    return response.json()["id"]


def finished(client: httpx.Client, job_id: str) -> dict:
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in FINAL and j, STALL, f"job {job_id}", 0.05)
    if job["state"] != "succeeded":
        sys.exit(f"job {job_id} {job['state']}: {job['error']}")
    return job


@contextmanager
def service(work: Path, name: str, models: Path, workers: int):
    """A fresh API plus ``workers`` Celery workers, all ready (so idle) before it yields a client."""
    flush = redis.Redis.from_url(REDIS_URL).flushdb
    flush()
    home, logs = work / name / "home", work / name / "logs"
    logs.mkdir(parents=True)
    env = {**os.environ, "MERGER_HOME": str(home), "MERGER_MODEL_ROOTS": str(models), "MERGER_BROKER_URL": REDIS_URL}
    env.pop("MERGER_DATABASE_URL", None)
    svc = Service(env, logs)
    try:
        for _ in range(workers):
            svc.start_worker()  # returns once the worker is consuming
        yield svc.client(svc.token("bench"))
    finally:
        svc.stop()
        flush()


def latency(client: httpx.Client, n: int) -> dict:
    server, observed = [], []
    for i, weight in enumerate(weights(n + 1)):
        job_id = submit(client, weight)
        posted = time.perf_counter()
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] != "queued", STALL, f"job {job_id} to start", 0.005)
        seen = time.perf_counter() - posted
        job = finished(client, job_id)
        if i:  # job 0 is the warm-up
            server.append(between(job, "created_at", "started_at"))
            observed.append(seen)
        time.sleep(IDLE_PAUSE)
    return {"jobs": n, "server_median_s": statistics.median(server), "server_p95_s": p95(server),
            "client_median_s": statistics.median(observed), "client_p95_s": p95(observed),
            "server_s": server, "client_s": observed}


def throughput(client: httpx.Client, n: int, workers: int) -> dict:
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda w: submit(client, w), weights(n)))
    jobs = [finished(client, job_id) for job_id in ids]
    first = min(datetime.fromisoformat(j["created_at"]) for j in jobs)
    last = max(datetime.fromisoformat(j["finished_at"]) for j in jobs)
    span = (last - first).total_seconds()
    return {"workers": workers, "jobs": n, "span_s": span, "jobs_per_s": n / span,
            "run_median_s": statistics.median(between(j, "started_at", "finished_at") for j in jobs),
            "wait_median_s": statistics.median(between(j, "created_at", "started_at") for j in jobs)}


def report(results: dict) -> None:
    lat = results["latency"]
    latency_table = Table(title=f"submit → running, 1 idle worker, {lat['jobs']} jobs")
    for column in ("measured", "median ms", "p95 ms"):
        latency_table.add_column(column, justify="right")
    for side, what in (("server", "started_at - created_at"), ("client", "POST returned → seen running")):
        latency_table.add_row(what, f"{lat[f'{side}_median_s'] * 1000:.0f}", f"{lat[f'{side}_p95_s'] * 1000:.0f}")
    throughput_table = Table(title="jobs submitted at once")
    for column in ("workers", "jobs", "span s", "jobs/s", "run median s", "wait median s"):
        throughput_table.add_column(column, justify="right")
    for row in results["throughput"]:
        throughput_table.add_row(str(row["workers"]), str(row["jobs"]), f"{row['span_s']:.1f}", f"{row['jobs_per_s']:.2f}",
                                 f"{row['run_median_s']:.2f}", f"{row['wait_median_s']:.1f}")
    console.print(latency_table, throughput_table)
    before, after = ("/".join(map(str, results[k])) for k in ("load_before", "load_after"))
    console.print(f"{results['cores']} cores; load average (1/5/15 min) before {before}, after {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=10, help="jobs in the latency phase (plus one warm-up)")
    parser.add_argument("--jobs", type=int, default=20, help="jobs submitted at once in each throughput phase")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".work" / "service-results.json")
    args = parser.parse_args()
    if not redis_answers(REDIS_URL):
        sys.exit(f"no Redis answers at {REDIS_URL}")

    results = {"cores": os.cpu_count(), "load_before": load()}
    work = Path(tempfile.mkdtemp(prefix="merger-service-bench-"))
    console.print(f"work dir (kept with the service logs if a phase fails): {work}")
    make_family(work / "models", "gemma3")
    with service(work, "latency", work / "models", 1) as client:
        results["latency"] = latency(client, args.sequential)
    results["throughput"] = []
    for workers in (1, 2):
        with service(work, f"throughput-{workers}", work / "models", workers) as client:
            results["throughput"].append(throughput(client, args.jobs, workers))
    results["load_after"] = load()
    shutil.rmtree(work)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    console.print(f"results in {args.out}")


if __name__ == "__main__":
    main()
