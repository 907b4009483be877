"""Putting a job on a Celery queue (by task name: the API process never imports the tasks)."""


def enqueue(job_id: str, queue: str) -> None:
    from worker.app import app

    app.send_task("merger.run_job", args=[job_id], queue=queue)
