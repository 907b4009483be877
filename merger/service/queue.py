"""Putting a job on a Celery queue (by task name: the API process never imports the tasks), and
asking which queues live workers consume."""

import time

LIVE_QUEUES_TTL = 30.0
_live: tuple[float, set[str]] = (0.0, set())


def enqueue(job_id: str, queue: str) -> None:
    from worker.app import app

    app.send_task("merger.run_job", args=[job_id], queue=queue)


def live_queues() -> set[str]:
    """Queues some worker consumes, asked of the workers (broadcast, 1 s) at most every 30 s.

    The embedded SQLite broker has no broadcast: there the answer is always empty, so jobs go to `cpu`.
    """
    global _live
    asked, queues = _live
    if time.monotonic() - asked > LIVE_QUEUES_TTL:
        from worker.app import app

        replies = app.control.inspect(timeout=1.0).active_queues() or {}
        queues = {q["name"] for worker_queues in replies.values() for q in worker_queues}
        _live = (time.monotonic(), queues)
    return queues
