"""Thin tasks: load the job by id, let the library run it, the library records the result.

The library is imported here, in the worker's parent process, so each forked job process starts with
torch and mergekit already loaded (importing torch does not initialise CUDA).
"""

from sqlalchemy.exc import OperationalError

from merger.service.jobs import Jobs
from merger.service.queue import enqueue
from merger.store import Store
from worker.app import app, settings


# a database that is briefly locked or unreachable must not lose the job: retry the message
@app.task(name="merger.run_job", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=8)
def run_job(job_id: str) -> None:
    Jobs(settings, Store(settings), enqueue).execute(job_id)
