"""The Celery app. Broker: ``MERGER_BROKER_URL`` (Redis in production), else kombu's SQLite transport
under ``MERGER_HOME`` so that one machine needs nothing else. Results live in merger's database, so
Celery keeps none."""

from celery import Celery
from kombu import Queue

from merger.settings import Settings

settings = Settings()
app = Celery("merger", broker=settings.resolved_broker_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,  # a job whose worker dies is not lost...
    task_reject_on_worker_lost=True,  # ...but redelivered
    worker_prefetch_multiplier=1,  # one long job at a time per process
    worker_max_tasks_per_child=1,  # a fresh process per job: clean mergekit caches, no CUDA state carried over
    task_ignore_result=True,
    task_queues=(Queue("cpu"), Queue("gpu")),
    task_default_queue="cpu",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if settings.uses_redis:
    # longer than the longest job, or Redis redelivers a running job (the lease guards it anyway)
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.broker_transport_options = transport
    app.conf.result_backend_transport_options = transport
else:
    # kombu's SQLAlchemy transport hands these to create_engine; a long busy timeout for several workers
    app.conf.broker_transport_options = {"connect_args": {"timeout": 60}}

