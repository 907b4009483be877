"""Jobs: submitted recipes, queued to workers, run by the orchestrator, recorded in the database.

The database is the source of truth: a job's state moves queued -> running -> succeeded | failed |
cancelled only here. The broker only carries "run job <id>" messages, which may arrive twice or never
(a killed worker); the lease and the reaper make up for both.
"""

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from merger.access import grant
from merger.db import JobRow, utcnow
from merger.errors import Cancelled, MergerError, RecipeError
from merger.orchestrator import cached_results, check_recipe, final_model, run_recipe
from merger.progress import ProgressEvent
from merger.service.auth import ensure_user
from merger.service.leases import DatabaseLeases, LeaseKeeper, Leases, make_leases
from merger.settings import Settings
from merger.store import Store

LOG = logging.getLogger(__name__)
FINAL = frozenset({"succeeded", "failed", "cancelled"})
WRITE_EVERY = 0.5  # seconds between progress writes and cancel checks

Enqueue = Callable[[str, str], None]  # (job id, queue)
LiveQueues = Callable[[], set[str]]  # the queues some worker consumes now


class Jobs:
    def __init__(self, settings: Settings, store: Store, enqueue: Enqueue, leases: Leases | None = None,
                 live_queues: LiveQueues = set):
        self.settings, self.store, self.enqueue, self.live_queues = settings, store, enqueue, live_queues
        self.session = store.session
        self.leases = leases or make_leases(settings, store.session)
        # the running worker's heartbeat in the job row (with database leases, the lease itself)
        self.heartbeats = self.leases if isinstance(self.leases, DatabaseLeases) else DatabaseLeases(store.session, settings.lease_seconds)

    # --- API side ----------------------------------------------------------------------------------------

    def submit(self, owner: str, recipe: dict, *, name: str, force: bool = False, gpu: bool = False) -> JobRow:
        """Check the recipe as ``owner`` sees the store (``RecipeError`` lists all problems); a fully cached recipe
        succeeds at once, and its owner may read what the cache holds (owning it stays with whoever made it)."""
        parsed = check_recipe(recipe, self.settings, self.store, default_name=name, viewer=owner)
        cached = None if force else cached_results(parsed, self.settings, self.store, viewer=owner)
        job = JobRow(id=uuid.uuid4().hex, owner=owner, recipe=recipe, recipe_name=name, force=force,
                     queue="gpu" if gpu and "gpu" in self.live_queues() else "cpu", state="queued")
        if cached:
            job.state, job.model_id, job.finished_at = "succeeded", cached[-1].id, utcnow()
        with self.session.begin() as s:
            ensure_user(s, owner)
            s.add(job)
            if cached:
                self._grant(s, owner, read=[m.id for m in cached])
        if not cached:
            self.enqueue(job.id, job.queue)
        return self.get(job.id)

    def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        with self.session() as s:
            job = s.get(JobRow, job_id)
        return job if job and (owner is None or job.owner == owner) else None

    def owned_by(self, owner: str) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.owner == owner).order_by(JobRow.created_at.desc())))

    def cancel(self, job_id: str) -> JobRow:
        """A queued job is cancelled at once; a running one at its next tensor or stage boundary."""
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued")
                      .values(state="cancelled", finished_at=utcnow(), cancel_requested=True))
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "running").values(cancel_requested=True))
        return self.get(job_id)

    def _grant(self, s, user: str, *, read: list[str], owned: list[str] = ()) -> None:
        """A job's owner owns the models its run stored, may read the others it produced or found cached, and the
        inputs of all of them (the owner named those, as they saw the store; nothing further up is granted)."""
        outputs = [*owned, *read]
        inputs = {edge.parent_id for model_id in outputs for edge in self.store.get(model_id).parents}
        grant(s, sorted(inputs - set(outputs)), user)
        grant(s, read, user)
        grant(s, list(owned), user, owner=True)

    def reap(self) -> list[str]:
        """Re-enqueue the jobs that would otherwise wait forever; returns their ids.

        A ``running`` job whose lease and heartbeat have both lapsed lost its worker (it died, or lost the lease
        and has stopped: its heartbeat goes on until then, so a job never runs twice at once); it goes back to
        ``queued``, or to ``cancelled`` if a cancel was asked for. A ``queued`` job whose message is older than
        ``queued_timeout`` may have lost it (a broker restarted empty): it is enqueued again; a duplicate
        message is harmless, the lease lets one worker run it.
        """
        with self.session() as s:
            running = list(s.scalars(select(JobRow.id).where(JobRow.state == "running")))
        lapsed = [job_id for job_id in running if not self.leases.held(job_id) and not self.heartbeats.held(job_id)]
        requeued = [job_id for job_id in lapsed if self._requeue(job_id, JobRow.state == "running")]
        stale = utcnow() - timedelta(seconds=self.settings.queued_timeout)
        waiting = JobRow.enqueued_at < stale
        with self.session() as s:
            lost = list(s.scalars(select(JobRow.id).where(JobRow.state == "queued", waiting)))
        return requeued + [job_id for job_id in lost if self._requeue(job_id, JobRow.state == "queued", waiting)]

    def _requeue(self, job_id: str, *conditions) -> bool:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.cancel_requested.is_(True), *conditions)
                      .values(state="cancelled", finished_at=utcnow(), worker=None, lease_until=None))
            result = s.execute(update(JobRow).where(JobRow.id == job_id, *conditions)
                               .values(state="queued", stage=None, done=0, total=0, worker=None, lease_until=None,
                                       enqueued_at=utcnow()))
        if not result.rowcount:
            return False
        LOG.warning("job %s: worker or broker message lost; re-enqueued", job_id)
        self.enqueue(job_id, self.get(job_id).queue)
        return True

    # --- worker side -------------------------------------------------------------------------------------

    def execute(self, job_id: str) -> None:
        """Run a job if it still needs running and nobody else runs it; record the outcome."""
        job = self.get(job_id)
        if job is None or job.state in FINAL:
            return
        with LeaseKeeper(self.leases, job_id, self.settings.lease_seconds, self.heartbeats) as keeper:
            if keeper is None:
                LOG.info("job %s: another worker holds the lease; leaving it", job_id)
                return
            with self.session.begin() as s:
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued", JobRow.cancel_requested.is_(True))
                          .values(state="cancelled", finished_at=utcnow()))
                started = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued", JobRow.cancel_requested.is_(False))
                                    .values(state="running", started_at=utcnow(), worker=keeper.holder, attempts=JobRow.attempts + 1,
                                            lease_until=utcnow() + timedelta(seconds=self.settings.lease_seconds)))
            if not started.rowcount:
                return
            LOG.info("job %s: run started by %s", job_id, keeper.holder)
            try:
                self._run(job, keeper)
            finally:
                LOG.info("job %s: run ended", job_id)

    def _run(self, job: JobRow, keeper: LeaseKeeper) -> None:
        progress = _Progress(self.session, job.id, keeper)
        try:
            # as its owner sees the store now, among the models there were when it was submitted
            seen = {"viewer": job.owner, "as_of": job.created_at}
            recipe = check_recipe(job.recipe, self.settings, self.store, default_name=job.recipe_name, **seen)
            results = run_recipe(recipe, self.settings, self.store, force=job.force, report=progress.report,
                                 should_cancel=progress.should_cancel, **seen)
        except Cancelled:
            if keeper.lost.is_set():
                LOG.warning("job %s: lease lost; stopped, left to the reaper", job.id)
                return
            self._finish(job.id, keeper, "cancelled")
        except RecipeError as exc:
            self._finish(job.id, keeper, "failed", error=("invalid_recipe", str(exc)))
        except MergerError as exc:
            self._finish(job.id, keeper, "failed", error=("stage_failed", str(exc)))
        except Exception as exc:  # noqa: BLE001 - recorded for the user, logged with its traceback for operators
            LOG.exception("job %s failed", job.id)
            self._finish(job.id, keeper, "failed", error=("internal_error", f"{type(exc).__name__}: {exc}"))
        else:
            # the models an evaluate stage named (the owner may read their results); not the parents it compared them with
            evaluated = [subject.model.id for r in results if r.evaluation for subject in r.evaluation.subjects
                         if subject.relation == "evaluated"]
            try:
                with self.session.begin() as s:
                    self._grant(s, job.owner, owned=[r.model.id for r in results if r.model and r.created],
                                read=[r.model.id for r in results if r.model and not r.created])
                    grant(s, evaluated, job.owner)
            except SQLAlchemyError:
                LOG.exception("job %s: could not record its results", job.id)
                self._finish(job.id, keeper, "failed", error=("internal_error", "the job's results could not be recorded"))
                return
            final = final_model(results)
            self._finish(job.id, keeper, "succeeded", model_id=final.id if final else None)

    def _finish(self, job_id: str, keeper: LeaseKeeper, state: str, *, model_id: str | None = None,
                error: tuple[str, str] | None = None) -> None:
        """Record the outcome; if the database refuses it (PostgreSQL takes no NUL in text, say), record a generic
        failure instead, so the job never stays ``running`` to be re-run forever."""
        code, message = error or (None, None)
        try:
            self._record(job_id, keeper, state=state, model_id=model_id, error_code=code,
                         error_message=message and recordable(message))
        except (SQLAlchemyError, ValueError):  # ValueError: text the driver cannot encode
            LOG.exception("job %s: could not record its outcome (%s); recording a generic failure", job_id, state)
            self._record(job_id, keeper, state="failed", model_id=None, error_code="internal_error",
                         error_message="the job ended but its outcome could not be recorded; see the worker's log")

    def _record(self, job_id: str, keeper: LeaseKeeper, **values) -> None:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == keeper.holder, JobRow.state == "running")
                      .values(finished_at=utcnow(), **values))


def recordable(message: str) -> str:
    """A message any database stores: NUL and lone surrogates escaped, at most 4,000 characters."""
    return message.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")[:4000]


class _Progress:
    """Writes progress to the job row and reads the cancel flag, each at most every WRITE_EVERY seconds."""

    def __init__(self, session, job_id: str, keeper: LeaseKeeper):
        self.session, self.job_id, self.keeper = session, job_id, keeper
        self._written = self._checked = 0.0
        self._cancel = False

    def report(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.phase == "progress" and now - self._written < WRITE_EVERY and event.done != event.total:
            return
        self._written = now
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == self.job_id).values(stage=event.stage, done=event.done, total=event.total))

    def should_cancel(self) -> bool:
        if self.keeper.lost.is_set():
            return True  # another worker may own the job now
        now = time.monotonic()
        if now - self._checked >= WRITE_EVERY:
            self._checked = now
            with self.session() as s:
                self._cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == self.job_id)))
        return self._cancel

