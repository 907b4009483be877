"""API tokens (stored as sha256 hashes). Who may see which model is `merger.access`."""

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from merger.db import TokenRow, UserRow, add_unless_exists
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
