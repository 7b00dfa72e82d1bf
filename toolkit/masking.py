"""Sensitive keys in JSON values (payloads, results, metadata, event details) and their mask.

This is the one place that decides what is hidden (URLs have :func:`toolkit.config.mask_url`).
Every read side uses it: the Inspector's frames, snapshots, the dashboard, the CLI,
and the messages of errors about a JSON value.

What matches
    A key is sensitive when its *normalized* name (lower case, only ``a-z`` and
    ``0-9``) contains a normalized entry of the list as a substring. So ``password``
    matches ``db_password``, ``Password`` and ``PASSWORD_HASH``; ``api_key`` matches
    ``X-Api-Key`` and ``apiKey``; ``token`` matches ``refresh_token`` (and also
    ``tokens_used``: a false positive hides a value, it never shows one). Keys are
    matched at any depth, inside lists too.
What is masked
    The whole value of a sensitive key (a string, a number, an object, a list)
    becomes :data:`MASK`. Other keys and values are kept as they are; a secret
    stored under a key that does not match (or inside free text such as an
    error message) is not found.
The list
    :data:`DEFAULT_SENSITIVE_KEYS`, extended by the ``sensitive_keys`` argument
    of an Inspector or, when that is not given, by the ``TOOLKIT_SENSITIVE_KEYS``
    environment variable (comma-separated). An entry ``-name`` removes a default
    (``TOOLKIT_SENSITIVE_KEYS="ssn,-session"``): a list given never silently drops
    the defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from toolkit import errors

MASK = "***"
"""What a sensitive value is replaced by."""
ENV_VAR = "TOOLKIT_SENSITIVE_KEYS"
"""Environment variable extending (or, with ``-name``, trimming) the default list."""
DEFAULT_SENSITIVE_KEYS = ("password", "passwd", "secret", "token", "api_key", "apikey",
                          "authorization", "cookie", "session", "credit_card")
"""The keys hidden unless told otherwise (matched as normalized substrings)."""

NOT_KEPT = r"[^a-z0-9]+"
"""What :func:`normalize` removes after lower-casing (the same pattern runs in Arrow, vectorized)."""
_NOT_KEPT = re.compile(NOT_KEPT)
MAX_DEPTH = 100
"""Levels :meth:`Masker.mask` walks; deeper than this is masked whole."""


def normalize(key: str) -> str:
    """``key`` in lower case with only ``a-z`` and ``0-9`` (``X-Api-Key`` -> ``xapikey``)."""
    return _NOT_KEPT.sub("", key.lower())


def _entries(given: str | Iterable[str]) -> list[str]:
    items = given.split(",") if isinstance(given, str) else list(given)
    if not all(isinstance(i, str) for i in items):
        raise errors.ConfigurationError(f"invalid sensitive_keys={given!r}: a list of key names "
                                        "(or one comma-separated string)")
    return [i.strip() for i in items if i.strip()]


def sensitive_keys(given: str | Iterable[str] | None = None, *,
                   environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The normalized list in force: the defaults, plus ``given`` (else the environment).

    Parameters
    ----------
    given
        Names to add (``"ssn"``), or to remove from the defaults (``"-session"``),
        as a list or one comma-separated string. ``None`` reads :data:`ENV_VAR`.
    environ
        Where to read :data:`ENV_VAR` (default ``os.environ``).

    Raises
    ------
    ConfigurationError
        Not strings, a name with no letter or digit, or ``-name`` for a name
        that is not in the list.
    """
    env = os.environ if environ is None else environ
    source = given if given is not None else env.get(ENV_VAR, "")
    if not isinstance(source, str | Iterable):
        raise errors.ConfigurationError(f"invalid sensitive_keys={source!r}: a list of key names "
                                        "(or one comma-separated string)")
    keys = [normalize(k) for k in DEFAULT_SENSITIVE_KEYS]
    for entry in _entries(source):
        name = normalize(entry.removeprefix("-"))
        if not name:
            raise errors.ConfigurationError(f"invalid sensitive_keys entry {entry!r}: it has no "
                                            "letter or digit")
        if entry.startswith("-"):
            if name not in keys:
                raise errors.ConfigurationError(f"invalid sensitive_keys entry {entry!r}: "
                                                f"{name!r} is not in the list {keys}")
            keys.remove(name)
        elif name not in keys:
            keys.append(name)
    return tuple(keys)


def pattern(keys: Iterable[str]) -> str:
    """A regular expression (RE2 and Python syntax, case-insensitive) that finds text whose
    :func:`normalize` form contains one of ``keys``: each key's characters in order, with
    only removed characters between them. For vectorized pre-checks (Arrow)."""
    between = "[^a-z0-9]*"
    return "(?i)" + "|".join(between.join(re.escape(ch) for ch in normalize(k)) for k in keys)


@functools.lru_cache(maxsize=4096)
def _matches(key: str, keys: tuple[str, ...]) -> bool:
    norm = normalize(key)
    return any(k in norm for k in keys)


@dataclasses.dataclass(frozen=True)
class Masker:
    """Masks the values of sensitive keys; ``keys`` are normalized names (default: the defaults).

    Use :meth:`mask` on a JSON value and :meth:`text` on JSON text.
    """

    keys: tuple[str, ...] = tuple(normalize(k) for k in DEFAULT_SENSITIVE_KEYS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(normalize(k) for k in self.keys))

    def is_sensitive(self, key: str) -> bool:
        """Whether the value under ``key`` is hidden."""
        return _matches(key, self.keys)

    def mask(self, value: Any, _depth: int = 0) -> Any:
        """A copy of ``value`` with the value of every sensitive key replaced by :data:`MASK`.

        Below :data:`MAX_DEPTH` levels everything is masked (no JSON value is that deep).
        """
        if _depth > MAX_DEPTH:
            return MASK
        if isinstance(value, dict):
            return {k: MASK if isinstance(k, str) and self.is_sensitive(k)
                    else self.mask(v, _depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask(v, _depth + 1) for v in value]
        return value

    def may_hold(self, text: str) -> bool:
        """A quick test: False means ``text`` surely holds no sensitive key."""
        norm = normalize(text)
        return any(k in norm for k in self.keys)

    def text(self, text: Any) -> Any:
        """JSON text with sensitive values masked; unchanged when nothing matched or not JSON.

        ``None`` and other non-strings (a missing cell) are returned as they are.
        """
        if not isinstance(text, str) or not self.may_hold(text):
            return text
        try:
            value = json.loads(text)
        except ValueError:
            return text
        masked = self.mask(value)
        return text if masked == value else json.dumps(masked, ensure_ascii=False)


def for_message(value: Any) -> Any:
    """``value`` masked with the list in force (defaults and environment), for an error message.

    Never raises: a list that does not parse falls back to the defaults.
    """
    try:
        keys = sensitive_keys()
    except errors.ConfigurationError:
        keys = Masker().keys
    return Masker(keys).mask(value)
