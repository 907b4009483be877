"""A lease per running job, so that a job never runs twice at once.

Celery on Redis redelivers a message that outlives the visibility timeout while the first worker still
runs it (celery #5935, #6229); a worker that cannot take the job's lease leaves the job alone. The
holder renews the lease while it works; a lease that lapses (the worker died) lets the reaper
re-enqueue the job. With Redis the lease is a key set with NX and an expiry; without Redis (the
embedded default) it is a conditional UPDATE of the job row.
"""

import logging
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

LOG = logging.getLogger(__name__)

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

        # a renewal that hangs on a dead connection must fail before the lease lapses
        self.client = redis.Redis.from_url(url, socket_timeout=seconds / 3, socket_connect_timeout=seconds / 3)
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
    """Holds a job's lease while the job runs, and keeps a heartbeat in the job's row until the run has stopped.

    A thread renews the lease every third of its period; if a renewal fails (Redis restarted empty, or does not
    answer), ``lost`` is set and the run stops at its next check. With Redis leases the same thread also
    writes the row's ``lease_until`` (the heartbeat), and goes on writing it after the lease is lost, until the
    run has really stopped: the reaper re-enqueues a job only when both have lapsed, so a job never runs twice
    at once, however long its run takes to notice.
    """

    def __init__(self, leases: Leases, job_id: str, seconds: float, heartbeat: DatabaseLeases | None = None):
        self.leases, self.job_id, self.interval = leases, job_id, seconds / 3
        self.heartbeat = None if heartbeat is leases else heartbeat
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
            if not self.lost.is_set() and not self._succeeds(self.leases.renew, "lease renewal"):
                LOG.warning("job %s: lease lost; stopping the job", self.job_id)
                self.lost.set()
            if self.heartbeat:
                self._succeeds(self.heartbeat.renew, "heartbeat")

    def _succeeds(self, step, what: str) -> bool:
        try:
            return bool(step(self.job_id, self.holder))
        except Exception:  # noqa: BLE001 - Redis or the database unreachable
            LOG.warning("job %s: %s failed", self.job_id, what, exc_info=True)
            return False

    def __exit__(self, *exc) -> None:
        if self._thread.ident is None:  # never acquired
            return
        self._stop.set()
        self._thread.join()
        if not self.lost.is_set():
            self._succeeds(self.leases.release, "releasing the lease")  # an unreleased lease just expires
        if self.heartbeat:
            self._succeeds(self.heartbeat.release, "ending the heartbeat")  # the run has stopped: the reaper may act
