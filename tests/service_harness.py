"""Real processes for service tests: a Redis, the API (`merger serve`) and Celery workers (`merger worker`)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_private_redis(tmp: Path) -> tuple[str, subprocess.Popen]:
    """A throwaway redis-server, for machines where none runs; a missing redis-server is a failure."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("no Redis answers at MERGER_TEST_REDIS_URL and redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: redis_answers(url), 10, "private redis-server")
    return url, proc


def wait_for(check, seconds: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {seconds} s waiting for {what}")


class Service:
    """An API process plus worker processes sharing one MERGER_HOME, database and broker."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen] = []
        self.start_api()

    def start_api(self) -> None:
        """The API process (`merger serve`, no local workers), once it answers."""
        self.api, _ = self._spawn("api", [str(BIN / "merger"), "serve", "--port", str(self.port), "--workers", "0"])
        wait_for(self._api_up, 60, "the API")

    def stop_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGTERM)
        self.api.wait(timeout=30)

    def _spawn(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        path = self.logs / f"{name}-{len(self.workers)}.log"
        # own session: SIGKILL to the group takes the worker's job processes too
        proc = subprocess.Popen(cmd, env=self.env, stdout=open(path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        return proc, path

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self) -> subprocess.Popen:
        """A Celery worker on the cpu queue, once it is consuming (Celery logs "ready")."""
        proc, log = self._spawn("worker", [str(BIN / "merger"), "worker", "--queues", "cpu"])
        self.workers.append(proc)
        wait_for(lambda: " ready." in log.read_text() or proc.poll() is not None, 120, "a worker to be ready")
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {log.read_text()[-2000:]}")
        return proc

    def stop_worker(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        self.workers.remove(proc)

    def token(self, user: str) -> str:
        out = subprocess.run([str(BIN / "merger"), "token", "create", "--user", user], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, self.api]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill(proc)


def restart_redis_empty(proc: subprocess.Popen, url: str, while_down=lambda: None) -> subprocess.Popen:
    """Kill a private redis-server (SIGKILL: it saves nothing), call ``while_down``, start it again on the same
    port, empty."""
    proc.kill()
    proc.wait()
    while_down()
    restarted = subprocess.Popen(proc.args, stdout=subprocess.DEVNULL)
    wait_for(lambda: redis_answers(url), 10, "the restarted redis-server")
    return restarted
