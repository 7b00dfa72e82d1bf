"""The Redis connection, its retry policy, its scripts and its error translation.

redis-py re-sends a command after a timeout by default; for ``INCR`` or a Lua
pop that would count or pop twice. Our client is built with an explicit
policy of *no* automatic retry (``Retry(NoBackoff(), 0)``). Idempotent calls
(cache fills, ZADD, reads) may be retried once by :func:`call` on a broken
connection, which is what a restarted Redis looks like to a pooled client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from toolkit import config, errors

log = logging.getLogger(__name__)
T = TypeVar("T")

SCRIPT_NAMES = (
    "set_if_newer",
    "set_many_if_newer",
    "claim_job",
    "return_inflight",
    "acquire_lock",
    "release_lock",
    "extend_lock",
    "incr_metric",
    "raise_metrics",
)


class Client:
    """A redis-py client plus the registered Lua scripts of the toolkit.

    Parameters
    ----------
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL.
    socket_timeout
        Seconds to wait for a reply before the call fails (never re-sent).
    """

    def __init__(self, url: str, *, socket_timeout: float = 5.0, read_only: bool = False) -> None:
        self.url = url
        self.where = config.host_port(url)
        # Typed as Any: redis-py types every reply as bytes | str whatever
        # decode_responses says; with decode_responses=True they are str.
        self.redis: Any = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 5.0),
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=True,
            client_name="toolkit-inspector" if read_only else "toolkit",
        )
        self.scripts: dict[str, Script] = {}
        if not read_only:
            pkg = resources.files("toolkit.tiers.redis") / "scripts"
            for name in SCRIPT_NAMES:
                text = (pkg / f"{name}.lua").read_text(encoding="utf-8")
                self.scripts[name] = self.redis.register_script(text)

    def __repr__(self) -> str:
        return f"Client({config.mask_url(self.url)!r})"

    def close(self) -> None:
        """Close every pooled connection."""
        self.redis.close()

    @contextlib.contextmanager
    def translate(self, action: str) -> Iterator[None]:
        """Turn any redis-py error raised inside into :class:`StorageUnavailable`."""
        try:
            yield
        except redis.RedisError as exc:
            raise errors.StorageUnavailable(
                f"Redis at {self.where} failed during {action}: {type(exc).__name__}: {exc}"
            ) from exc

    def call(self, action: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run ``fn`` against Redis, translating errors.

        An idempotent call is tried once more after a connection error (a
        pooled connection to a Redis that restarted fails once); a call that
        is not idempotent, or that timed out, is never re-sent.
        """
        with self.translate(action):
            try:
                return fn()
            except redis.ConnectionError:
                if not idempotent:
                    raise
                log.debug("retrying %s once after a connection error", action,
                          extra={"action": action})
                return fn()

    def script(self, name: str) -> Script:
        """Return a registered Lua script by name."""
        return self.scripts[name]


def run_script(
    client: Client, name: str, keys: list[str], args: list[Any], *, pipe: Any = None
) -> Any:
    """Run a registered script, on ``pipe`` when given (then nothing is returned yet)."""
    script = client.script(name)
    if pipe is not None:
        return script(keys=keys, args=args, client=pipe)
    return script(keys=keys, args=args)
