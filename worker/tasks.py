"""Thin tasks: load the job by id, let the library run it, the library records the result."""

from worker.app import app, settings


@app.task(name="merger.run_job")
def run_job(job_id: str) -> None:
    from merger.service.jobs import Jobs
    from merger.service.queue import enqueue
    from merger.store import Store

    Jobs(settings, Store(settings), enqueue).execute(job_id)
