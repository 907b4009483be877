"""API tokens (stored as sha256 hashes). Who may see which model is ``merger.access`` (re-exported here)."""

import hashlib
import secrets

from sqlalchemy.orm import Session

from merger.access import can_see, grant, owned_by, owns, visible_to  # noqa: F401 - re-exported for the service
from merger.db import TokenRow, UserRow, add_unless_exists

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
