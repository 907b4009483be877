"""The web pages: server time per page and per editor check, and what each page makes the browser download.

A real `merger serve` (single-user, jobs in SQLite) on a temporary store holding the tiny Gemma 3 family of
tests/tiny_models.py and one linear merge of it made by `merger run`. Client-side wall times over loopback.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.service_harness import BIN, Service  # noqa: E402
from tests.tiny_models import make_family  # noqa: E402

THREE_PROBLEMS = "merge_method: ties\nbase_model: gemma3-base\ndtype: float99\nmodels:\n" \
                 "  - {model: gemma3-ft1, parameters: {weight: 0.5, density: 1.5}}\n" \
                 "  - {model: gemma3-nowhere, parameters: {weight: 0.5, density: 0.5}}\n"
VALID = "merge_method: linear\nmodels:\n  - {model: gemma3-ft1, parameters: {weight: 0.5}}\n" \
        "  - {model: gemma3-ft2, parameters: {weight: 0.5}}\n"
ASSET = re.compile(r'(?:src|href)="(/static/[^"]+)"')


def timed(call, repeats: int) -> tuple[float, float]:
    """Median and worst wall time in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


def page_bytes(client: httpx.Client, path: str) -> tuple[int, int]:
    """The page's HTML and the static files it names."""
    html = client.get(path).text
    return len(html.encode()), sum(len(client.get(asset).content) for asset in set(ASSET.findall(html)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        make_family(root, "gemma3")
        env = {**os.environ, "MERGER_HOME": f"{tmp}/home", "MERGER_MODEL_ROOTS": str(root), "MERGER_SINGLE_USER": "true"}
        for name in ("MERGER_DATABASE_URL", "MERGER_BROKER_URL"):
            env.pop(name, None)
        (Path(tmp) / "merged.yaml").write_text(VALID)
        subprocess.run([str(BIN / "merger"), "run", f"{tmp}/merged.yaml"], env=env, check=True, capture_output=True)
        (Path(tmp) / "logs").mkdir()
        service = Service(env, Path(tmp) / "logs")
        try:
            client = httpx.Client(base_url=service.url, headers={"origin": service.url}, timeout=60)
            model = next(m["id"] for m in client.get("/v1/models").json() if m["name"] == "merged")
            print(f"{'what':<42} {'median ms':>10} {'max ms':>8} {'HTML B':>8} {'assets B':>9}")
            pages = {"models list": "/models", "model page": f"/models/{model}", "lineage page": f"/models/{model}/lineage",
                     "jobs list": "/jobs", "editor": "/editor"}
            for label, path in pages.items():
                median, worst = timed(lambda p=path: client.get(p).raise_for_status(), args.repeats)
                html, assets = page_bytes(client, path)
                print(f"GET {label:<38} {median:>10.1f} {worst:>8.1f} {html:>8} {assets:>9}")
            for label, text in (("3 problems", THREE_PROBLEMS), ("valid", VALID)):
                body = {"recipe": text, "name": "bench"}
                median, worst = timed(lambda b=body: client.post("/editor/check", json=b).raise_for_status(), args.repeats)
                print(f"{'POST /editor/check, ' + label:<42} {median:>10.1f} {worst:>8.1f}")
            assert len(yaml.safe_load(client.post("/editor/check", json={"recipe": THREE_PROBLEMS}).text)["problems"]) == 3
        finally:
            service.stop()


if __name__ == "__main__":
    main()
