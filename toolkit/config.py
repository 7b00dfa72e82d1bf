"""Settings: arguments first, then the environment; validation and URL masking.

Nothing here does I/O. Every URL that reaches a log line, a repr or an error
message goes through :func:`mask_url` first.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from toolkit import errors

DATABASE_URL_VAR = "DATABASE_URL"
REDIS_URL_VAR = "REDIS_URL"
PG_PREPARE_VAR = "TOOLKIT_PG_PREPARE"
"""``auto`` (default), ``on`` or ``off``: server-side prepared statements (see
:func:`pg_prepare_mode`)."""

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PG_SCHEMES = {
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}
_REDIS_SCHEMES = {"redis", "rediss", "unix"}


def mask_url(url: str) -> str:
    """Return ``url`` with its password (if any) replaced by ``***``.

    Host, port, user and path are kept so an operator can still tell which
    server is meant. The user-info ends at the *last* ``@``, so a password
    holding an unescaped ``@``, ``:`` or ``/`` is still hidden whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a url>"
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest}"
    rest = re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def scrub(text: str, url: str) -> str:
    """Return ``text`` (a driver's error message) without any part of ``url``'s password.

    A driver may echo part of a password it mis-parsed (an unencoded ``@``
    makes libpq read ``PW@host`` as the host): the whole password and each of
    its pieces between ``@``, ``:`` and ``/`` are replaced by ``***``.
    """
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    if not password:
        return text
    pieces = {password, *re.split(r"[@:/]", password)}
    for piece in sorted((p for p in pieces if len(p) >= 2), key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


def _check_port(field: str, url: str) -> None:
    """Refuse a URL whose port is not a number (drivers raise a bare ValueError)."""
    hosts = url.partition("://")[2].rpartition("@")[2].split("/", 1)[0].split("?", 1)[0]
    for host in hosts.split(","):
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not port.isdigit():
            raise errors.ConfigurationError(
                f"invalid {field}={mask_url(url)!r}: the port {port!r} is not a number")


def host_port(url: str) -> str:
    """Return ``host:port`` of a URL for error messages (never the password)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")
    except ValueError:
        return "<unparsable url>"


def pg_prepare_mode(environ: Mapping[str, str] | None = None) -> str:
    """Whether the state layer's PostgreSQL connections use server-side prepared statements.

    ``auto`` (the default): yes on a direct connection to the server, no when something sits
    between (see ``toolkit.tiers.postgres.db._direct``: a pooler such as PgBouncer, a proxy),
    because a transaction pooler before 1.22, or without ``max_prepared_statements``, hands
    the next transaction a server connection that lacks them. ``on``: always (PgBouncer
    1.22+ with ``max_prepared_statements`` set). ``off``: never.

    Raises
    ------
    ConfigurationError
        ``TOOLKIT_PG_PREPARE`` holds anything else.
    """
    env = os.environ if environ is None else environ
    mode = env.get(PG_PREPARE_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise errors.ConfigurationError(f"{PG_PREPARE_VAR} must be auto, on or off, not {mode!r}")
    return mode


def resolve_database_url(url: str | None) -> str:
    """Return the PostgreSQL URL to use, as a ``postgresql+psycopg://`` URL.

    Raises
    ------
    ConfigurationError
        Neither the argument nor ``DATABASE_URL`` is set, or the scheme is not
        PostgreSQL.
    """
    url = url or os.environ.get(DATABASE_URL_VAR)
    if not url:
        raise errors.ConfigurationError(
            f"no PostgreSQL URL: pass database_url=... or set {DATABASE_URL_VAR}"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _PG_SCHEMES:
        raise errors.ConfigurationError(
            f"invalid database_url={mask_url(url)!r}: the scheme must be postgresql:// "
            "or postgresql+psycopg://"
        )
    _check_port("database_url", url)
    if rest.split("/", 1)[0].count("@") > 1:
        raise errors.ConfigurationError(
            f"invalid database_url={mask_url(url)!r}: the user or password holds an unencoded "
            "'@'; percent-encode it as %40")
    return f"{_PG_SCHEMES[scheme]}://{rest}"


def resolve_redis_url(url: str | None) -> str:
    """Return the Redis URL to use (``redis://``, ``rediss://`` or ``unix://``).

    Raises
    ------
    ConfigurationError
        Neither the argument nor ``REDIS_URL`` is set, or the scheme is wrong.
    """
    url = url or os.environ.get(REDIS_URL_VAR)
    if not url:
        raise errors.ConfigurationError(
            f"no Redis URL: pass redis_url=... or set {REDIS_URL_VAR}"
        )
    scheme = url.partition("://")[0]
    if scheme not in _REDIS_SCHEMES:
        raise errors.ConfigurationError(
            f"invalid redis_url={mask_url(url)!r}: the scheme must be redis://, rediss:// "
            "or unix://"
        )
    if scheme != "unix":
        _check_port("redis_url", url)
    return url


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is 1-64 characters of ``A-Z a-z 0-9 _ . -``."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise errors.ConfigurationError(
            f"invalid namespace={namespace!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return namespace


def validate_schema(schema: str) -> str:
    """Return ``schema`` if it is a lower-case PostgreSQL identifier of at most 63 bytes."""
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise errors.ConfigurationError(
            f"invalid schema={schema!r}: use a lower-case identifier [a-z_][a-z0-9_]*, "
            "at most 63 characters"
        )
    return schema


def validate_seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite, positive number of seconds."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise errors.ValidationError(name, value, "must be a finite number of seconds > 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved, validated settings of a StateManager or an Inspector."""

    database_url: str
    redis_url: str
    namespace: str = "wf"
    schema: str = "public"
    heartbeat_ttl: float = 30.0
    synchronous_commit: str = "on"
    """``"off"``: the state layer's sessions commit with ``synchronous_commit = off`` (see
    ``init_state_manager``); ``"on"``: the server's own setting."""

    def __repr__(self) -> str:
        opt_in = "" if self.synchronous_commit == "on" else \
            f", synchronous_commit={self.synchronous_commit!r}"
        return (
            f"Settings(database_url={mask_url(self.database_url)!r}, "
            f"redis_url={mask_url(self.redis_url)!r}, namespace={self.namespace!r}, "
            f"schema={self.schema!r}, heartbeat_ttl={self.heartbeat_ttl}{opt_in})"
        )

    __str__ = __repr__


def load_settings(
    database_url: str | None,
    redis_url: str | None,
    *,
    namespace: str = "wf",
    schema: str = "public",
    heartbeat_ttl: float = 30.0,
    synchronous_commit: str = "on",
) -> Settings:
    """Resolve URLs from arguments or the environment and validate every setting."""
    validate_namespace(namespace)
    validate_schema(schema)
    if not isinstance(synchronous_commit, str) or synchronous_commit not in ("on", "off"):
        raise errors.ConfigurationError(
            f"invalid synchronous_commit={synchronous_commit!r}: use 'on' or 'off'")
    try:
        ttl = validate_seconds("heartbeat_ttl", heartbeat_ttl)
    except errors.ValidationError as exc:
        raise errors.ConfigurationError(str(exc)) from None
    return Settings(
        database_url=resolve_database_url(database_url),
        redis_url=resolve_redis_url(redis_url),
        namespace=namespace,
        schema=schema,
        heartbeat_ttl=ttl,
        synchronous_commit=synchronous_commit,
    )
