"""The service: HTTP API, job queue on Celery, leases, accounts. Only this package and ``worker/``
import celery, redis and the web framework; the library below them runs recipes the same way."""
