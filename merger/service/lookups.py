"""Looking up a model or job as a user may see it, for the API and the web pages (404, never 403: no existence leak)."""

from fastapi import HTTPException
from sqlalchemy import select

from merger.access import can_see, owns, visible_to
from merger.db import JobRow, ModelRow
from merger.service.deps import Service
from merger.service.schemas import ModelOut
from merger.store import HEX


def visible_model(svc: Service, model_id: str, user: str) -> ModelRow:
    """A model by full id or unique id prefix among those the user may see; else 404."""
    model = svc.store.find(model_id, viewer=user) if HEX.match(model_id) else None
    if model is None:
        raise HTTPException(404, f"no model {model_id}")
    return model


def model_out(svc: Service, model: ModelRow, user: str) -> ModelOut:
    """A model as ``user`` may see it: a parent they may not see shows its id only (kind ``hidden``)."""
    out = ModelOut.of(model)
    with svc.store.session() as s:
        for parent in out.parents:
            if not can_see(s, parent.id, user):
                parent.name, parent.kind = None, "hidden"
    return out


def visible_models(svc: Service, user: str) -> list[ModelOut]:
    """Every model the user may see, oldest first."""
    with svc.store.session() as s:
        ids = list(s.scalars(select(ModelRow.id).where(visible_to(user)).order_by(ModelRow.created_at)))
    return [model_out(svc, svc.store.get(i), user) for i in ids]


def set_visibility(svc: Service, model_id: str, user: str, public: bool) -> ModelRow:
    """Publish or unpublish a model; only an owner (a user whose job stored it, or who registered it first) may."""
    model = visible_model(svc, model_id, user)
    with svc.store.session.begin() as s:
        if not owns(s, model.id, user):
            raise HTTPException(403, f"only the owner of model {model_id} may change its visibility")
        s.get(ModelRow, model.id).public = public
    return svc.store.get(model.id)


def own_job(svc: Service, job_id: str, user: str) -> JobRow:
    job = svc.jobs.get(job_id, owner=user)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def search_record(model: ModelRow, model_id: str) -> dict:
    record = (model.origin or {}).get("search")
    if not isinstance(record, dict):
        raise HTTPException(404, f"model {model_id} was not made by a search")
    return record
