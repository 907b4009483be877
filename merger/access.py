"""Who may see which model: the SQL conditions and grants behind every lookup the service makes as a user.

A user sees a model that is public or granted to them; an owner (a grant with ``owner``) may also change its
visibility. The library takes a *viewer*: a user name, or None for the local command line, which sees the
whole store.
"""

from datetime import datetime

from sqlalchemy import Select, and_, case, exists, or_, select
from sqlalchemy.orm import Session

from merger.db import GrantRow, ModelRow, add_unless_exists


def grant(s: Session, model_ids: list[str], user: str, *, owner: bool = False) -> None:
    """Let ``user`` see the models (and, with ``owner``, change their visibility); never takes ownership away."""
    for model_id in model_ids:
        if not add_unless_exists(s, GrantRow(model_id=model_id, user=user, owner=owner)) and owner:
            s.get(GrantRow, (model_id, user)).owner = True


def owns(s: Session, model_id: str, user: str) -> bool:
    row = s.get(GrantRow, (model_id, user))
    return bool(row and row.owner)


def can_see(s: Session, model_id: str, user: str) -> bool:
    return bool(s.scalar(select(visible_to(user)).where(ModelRow.id == model_id)))


def visible_to(user: str | None):
    """SQL condition: the model is public or granted to ``user`` (None, a caller without a token: public only)."""
    if user is None:
        return ModelRow.public.is_(True)
    granted = exists().where(GrantRow.model_id == ModelRow.id, GrantRow.user == user)
    return or_(ModelRow.public.is_(True), granted)


def owned_by(user: str):
    """SQL condition: ``user`` owns the model (a job of theirs produced it)."""
    return exists().where(GrantRow.model_id == ModelRow.id, GrantRow.user == user, GrantRow.owner.is_(True))


def adopt_store(s: Session, user: str) -> None:
    """Make ``user`` an owner of every model in the store they do not own yet (single-user mode: the local user owns
    the whole store, also models made by `merger run`, which have no owner)."""
    grant(s, list(s.scalars(select(ModelRow.id).where(~owned_by(user)))), user, owner=True)


def as_seen_by(query: Select, viewer: str | None, as_of: datetime | None = None) -> Select:
    """``query`` (over ModelRow) narrowed to the models ``viewer`` may see, best first: the viewer's own, then those
    granted to them, then public ones; newest first within each. None (the local command line): all, newest first.
    ``as_of``: only models stored by then (a job's run names what its submission could)."""
    if as_of is not None:
        query = query.where(ModelRow.created_at <= as_of)
    if viewer is None:
        return query.order_by(ModelRow.created_at.desc())
    mine = and_(GrantRow.model_id == ModelRow.id, GrantRow.user == viewer)
    rank = case((GrantRow.owner.is_(True), 0), (GrantRow.user.is_not(None), 1), else_=2)
    return (query.outerjoin(GrantRow, mine).where(or_(ModelRow.public.is_(True), GrantRow.user.is_not(None)))
            .order_by(rank, ModelRow.created_at.desc()))
