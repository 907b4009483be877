"""A small client of the API for the CLI: submit, follow, and pull (resumable, checked by sha256)."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from merger.errors import MergerError, Problem, RecipeError
from merger.hashing import sha256_file

CHUNK = 1 << 20


class Client:
    def __init__(self, server: str, token: str | None = None, timeout: float = 60.0):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code == 422 and "problems" in response.text:
            raise RecipeError([Problem(**p) for p in response.json()["problems"]])
        if response.status_code >= 400:
            detail = response.json().get("detail", response.text) if response.headers.get("content-type", "").startswith("application/json") else response.text
            raise MergerError(f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}")
        return response

    def submit(self, recipe_text: str, *, name: str, force: bool = False, gpu: bool = False) -> dict:
        body = {"recipe": recipe_text, "name": name, "force": force, "gpu": gpu}
        return self._check(self.http.post("/v1/jobs", json=body)).json()

    def job(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def events(self, job_id: str) -> Iterator[dict]:
        """The job's server-sent events, as job dicts, until it ends."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            self._check(response)
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:].strip())

    def model(self, model_id: str) -> dict:
        return self._check(self.http.get(f"/v1/models/{model_id}")).json()

    def pull(self, model_id: str, dest: Path, on_bytes: Callable[[int], None] = lambda n: None) -> dict:
        """Download every file of a model into ``dest``; resumes ``*.part`` files; verifies each sha256."""
        model = self.model(model_id)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in model["files"]:
            target = dest / entry["path"]
            if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
                on_bytes(entry["size"])
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            have = part.stat().st_size if part.exists() else 0
            if have > entry["size"]:
                part.unlink()
                have = 0
            on_bytes(have)
            if have < entry["size"]:
                headers = {"range": f"bytes={have}-"} if have else {}
                with self.http.stream("GET", f"/v1/models/{model['id']}/files/{entry['path']}", headers=headers) as response:
                    self._check(response)
                    mode = "ab" if response.status_code == 206 else "wb"
                    with open(part, mode) as fh:
                        for chunk in response.iter_bytes(CHUNK):
                            fh.write(chunk)
                            on_bytes(len(chunk))
            digest = sha256_file(part)
            if digest != entry["sha256"]:
                part.unlink()
                raise MergerError(f"{entry['path']}: sha256 {digest} does not match the server's {entry['sha256']}; removed, pull again")
            part.replace(target)
        return model

