"""A lease per running job, so that a job never runs twice at once.

Celery on Redis redelivers a message that outlives the visibility timeout while the first worker still
runs it (celery #5935, #6229); a worker that cannot take the job's lease leaves the job alone. The
holder renews the lease while it works; a lease that lapses (the worker died) lets the reaper
re-enqueue the job. With Redis the lease is a key set with NX and an expiry; without Redis (the
embedded default) it is a conditional UPDATE of the job row.
"""

import os
import socket
import threading
import uuid
from datetime import timedelta
from typing import Protocol

from sqlalchemy import or_, update
from sqlalchemy.orm import sessionmaker

from merger.db import JobRow, as_utc, utcnow
from merger.settings import Settings

# compare-and-renew / compare-and-delete, so a worker never touches a lease someone else took over
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Leases(Protocol):
    def acquire(self, job_id: str, holder: str) -> bool: ...
    def renew(self, job_id: str, holder: str) -> bool: ...
    def release(self, job_id: str, holder: str) -> None: ...
    def held(self, job_id: str) -> bool: ...


class RedisLeases:
    def __init__(self, url: str, seconds: float):
        import redis

        self.client = redis.Redis.from_url(url)
        self.ms = int(seconds * 1000)

    @staticmethod
    def _key(job_id: str) -> str:
        return f"merger:lease:{job_id}"

    def acquire(self, job_id: str, holder: str) -> bool:
        return bool(self.client.set(self._key(job_id), holder, nx=True, px=self.ms))

    def renew(self, job_id: str, holder: str) -> bool:
        return bool(self.client.eval(_RENEW, 1, self._key(job_id), holder, self.ms))

    def release(self, job_id: str, holder: str) -> None:
        self.client.eval(_RELEASE, 1, self._key(job_id), holder)

    def held(self, job_id: str) -> bool:
        return bool(self.client.exists(self._key(job_id)))


class DatabaseLeases:
    def __init__(self, session: sessionmaker, seconds: float):
        self.session = session
        self.seconds = seconds

    def _take(self, job_id: str, holder: str, *, only_mine: bool) -> bool:
        now = utcnow()
        free = JobRow.worker == holder if only_mine else or_(JobRow.lease_until.is_(None), JobRow.lease_until < now, JobRow.worker == holder)
        with self.session.begin() as s:
            result = s.execute(
                update(JobRow).where(JobRow.id == job_id, free).values(worker=holder, lease_until=now + timedelta(seconds=self.seconds))
            )
            return result.rowcount == 1

    def acquire(self, job_id: str, holder: str) -> bool:
        return self._take(job_id, holder, only_mine=False)

    def renew(self, job_id: str, holder: str) -> bool:
        return self._take(job_id, holder, only_mine=True)

    def release(self, job_id: str, holder: str) -> None:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == holder).values(lease_until=None))

    def held(self, job_id: str) -> bool:
        with self.session() as s:
            until = s.get(JobRow, job_id).lease_until
        return until is not None and as_utc(until) > utcnow()


def make_leases(settings: Settings, session: sessionmaker) -> Leases:
    if settings.uses_redis:
        return RedisLeases(settings.resolved_broker_url, settings.lease_seconds)
    return DatabaseLeases(session, settings.lease_seconds)


class LeaseKeeper:
    """Holds a job's lease while the job runs: renews it in a thread; ``lost`` is set if renewal fails."""

    def __init__(self, leases: Leases, job_id: str, seconds: float):
        self.leases, self.job_id, self.interval = leases, job_id, seconds / 3
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def __enter__(self) -> "LeaseKeeper | None":
        if not self.leases.acquire(self.job_id, self.holder):
            return None
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.leases.renew(self.job_id, self.holder):
                self.lost.set()
                return

    def __exit__(self, *exc) -> None:
        if self._thread.ident is None:  # never acquired
            return
        self._stop.set()
        self._thread.join()
        if not self.lost.is_set():
            self.leases.release(self.job_id, self.holder)
