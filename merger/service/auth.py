"""API tokens (stored as sha256 hashes) and who may see which model."""

import hashlib
import re
import secrets

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from merger.db import GrantRow, ModelRow, TokenRow, UserRow, add_unless_exists
from merger.errors import MergerError

SINGLE_USER = "local"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_user(s: Session, name: str) -> None:
    add_unless_exists(s, UserRow(name=name))


def create_token(s: Session, user: str) -> str:
    """A new token for ``user`` (created if new); only its hash is kept, so it is shown once."""
    ensure_user(s, user)
    token = "mrg_" + secrets.token_urlsafe(32)
    s.add(TokenRow(sha256=_digest(token), user=user))
    return token


def user_for_token(s: Session, token: str) -> str | None:
    row = s.get(TokenRow, _digest(token))
    return row.user if row else None


def grant(s: Session, model_ids: list[str], user: str, *, owner: bool = False) -> None:
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


TOKEN_ID_DIGITS = 12  # a token's id: the first hex digits of its hash (never the token itself)


def token_id(row: TokenRow) -> str:
    return row.sha256[:TOKEN_ID_DIGITS]


def list_tokens(s: Session, user: str | None = None) -> list[TokenRow]:
    query = select(TokenRow).order_by(TokenRow.user, TokenRow.created_at)
    return list(s.scalars(query if user is None else query.where(TokenRow.user == user)))


def revoke_token(s: Session, identifier: str) -> TokenRow:
    """Delete the token whose id (or a longer prefix of its hash) is ``identifier``; the API refuses it from then on."""
    if not re.fullmatch(f"[0-9a-f]{{{TOKEN_ID_DIGITS},64}}", identifier):
        raise MergerError(f"{identifier!r} is not a token id ({TOKEN_ID_DIGITS} or more hex digits, as `merger token list` shows)")
    rows = list(s.scalars(select(TokenRow).where(TokenRow.sha256.startswith(identifier))))
    if len(rows) != 1:
        raise MergerError(f"no token {identifier}" if not rows else f"{identifier} names {len(rows)} tokens; give more digits")
    s.delete(rows[0])
    return rows[0]
