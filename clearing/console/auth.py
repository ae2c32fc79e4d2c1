"""Operators and their sessions.

Passwords are kept as Argon2id hashes (argon2-cffi); a password is never taken on a command
line (``farebox clearing operator add`` reads it from standard input or a prompt). A session is
a cookie ``farebox_console`` = ``payload.mac``: the payload (operator name, a random nonce,
expiry) in URL-safe base64, the MAC an HMAC-SHA256 of it under a secret kept in the store's
``meta`` table (``console_secret``, made at first use: every receiver process on one database
accepts the others' cookies). The cookie is HttpOnly, SameSite=Strict, Path=/console, and
Secure over HTTPS. Every form carries a CSRF token: an HMAC of the session's nonce (a visitor
not signed in has a session without an operator, so the sign-in form is protected too); a
sign-in starts a new nonce. The operator's role is read from the store on every request, so a
changed role applies at once; the session is bound to the account's password hash at sign-in,
so a new password (``farebox clearing operator password``) or the account removed
(``operator remove``) ends every session it had at their next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, replace

from farebox.clearing.console.data import ROLES, ConsoleData, ConsoleError, Operator

COOKIE = "farebox_console"
SESSION_SECONDS = 8 * 3600
MIN_PASSWORD = 10
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # Argon2id, the library's (RFC 9106 low-memory) parameters


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def check_password(stored: str, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


# an Argon2id hash of nothing anyone types: a sign-in for an unknown name costs the same time
_DUMMY: list[str] = []


def add_operator(data: ConsoleData, name: str, role: str, password: str, at_utc: str) -> None:
    """A new operator account (ConsoleError: a bad name or role, a short password, a name
    taken)."""
    if not _NAME.fullmatch(name):
        raise ConsoleError("an operator name is 1-64 letters, digits and . _ @ -, starting "
                           "with a letter or digit")
    if role not in ROLES:
        raise ConsoleError(f"a role is one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise ConsoleError(f"a password is at least {MIN_PASSWORD} characters")
    data.add_operator(name, role, hash_password(password), at_utc)


def authenticate(data: ConsoleData, name: str, password: str) -> Operator | None:
    """The operator whose name and password these are, else None (an unknown name takes as
    long as a wrong password)."""
    operator = data.operator(name) if _NAME.fullmatch(name or "") else None
    if operator is None:
        if not _DUMMY:
            _DUMMY.append(hash_password(secrets.token_hex(16)))
        check_password(_DUMMY[0], password)
        return None
    if not check_password(operator.password_hash, password):
        return None
    if _hasher().check_needs_rehash(operator.password_hash):
        rehashed = hash_password(password)
        if not data.set_password_hash(operator.name, rehashed, operator.password_hash):
            return None  # its password changed meanwhile: this one is no longer it
        operator = replace(operator, password_hash=rehashed)  # the session binds to this one
    return operator


def change_password(data: ConsoleData, name: str, password: str, at_utc: str) -> None:
    """A new password for an account: every session it has ends (ConsoleError: a short
    password, an unknown name)."""
    if len(password) < MIN_PASSWORD:
        raise ConsoleError(f"a password is at least {MIN_PASSWORD} characters")
    data.change_operator(name, at_utc, password_hash=hash_password(password))


@dataclass(frozen=True)
class Session:
    operator: str | None  # None: a visitor not signed in
    nonce: str
    expires: int
    #: binds the session to the account's password hash and session epoch at sign-in: a new
    #: password, a sign-out or the account removed ends every session the account had
    account: str = ""


class Sessions:
    """Signing and reading session cookies, and the CSRF tokens derived from them."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def of(cls, data: ConsoleData) -> Sessions:
        secret = data.store.set_meta_if_absent("console_secret", secrets.token_hex(32))
        return cls(bytes.fromhex(secret))

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def new(self, operator: Operator | None) -> Session:
        return Session(None if operator is None else operator.name, secrets.token_urlsafe(18),
                       int(time.time()) + SESSION_SECONDS,
                       "" if operator is None else self._account(operator))

    def _account(self, operator: Operator) -> str:
        return self._mac(f"account:{operator.session_epoch}:{operator.password_hash}")[:32]

    def belongs(self, session: Session, operator: Operator) -> bool:
        """Whether ``session`` was signed in with the account's current password."""
        return (session.operator == operator.name
                and hmac.compare_digest(session.account, self._account(operator)))

    def cookie(self, session: Session) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {"o": session.operator, "n": session.nonce, "e": session.expires,
             "a": session.account}, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{payload}.{self._mac('session:' + payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, None unless its MAC verifies and it has not expired
        (the MAC is checked before any of it is parsed)."""
        if not cookie or len(cookie) > 1024 or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session:" + payload)):
            return None
        try:
            fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            session = Session(fields["o"], str(fields["n"]), int(fields["e"]),
                              str(fields.get("a", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if session.operator is not None and not isinstance(session.operator, str):
            return None
        return session if session.expires > time.time() else None

    def csrf(self, session: Session) -> str:
        return self._mac("csrf:" + session.nonce)

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        return (session is not None and bool(token)
                and hmac.compare_digest(str(token), self.csrf(session)))
