"""merger's Celery worker: ``celery -A worker.app worker`` (or ``merger worker``)."""
