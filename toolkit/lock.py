"""A distributed lock on Redis with owner tokens and fencing tokens."""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from types import TracebackType

from toolkit import errors, validate
from toolkit.tiers.redis import locks
from toolkit.tiers.redis.client import Client


class Lock:
    """A named lock shared by every process on one namespace.

    ``SET NX PX`` with a random owner token; release and extend are Lua
    compare-and-act, so only the holder can release or extend. Every
    acquisition hands out a :attr:`fencing_token` larger than any before it:
    pass it to the resource you protect and refuse writes with an older one.

    Parameters
    ----------
    name
        Lock name (1-255 characters).
    ttl
        Seconds the lock is held unless extended or released.
    blocking_timeout
        Seconds :meth:`acquire` waits by default; None waits for ever, 0 tries once.
    """

    def __init__(self, client: Client, ns: str, name: str, *, ttl: float = 30.0,
                 blocking_timeout: float | None = None,
                 reserve: Callable[[str, int], tuple[int, int]] | None = None) -> None:
        self.name = validate.identifier("name", name)
        self.ttl = validate.seconds("ttl", ttl)
        self.blocking_timeout = (None if blocking_timeout is None else
                                 validate.seconds("blocking_timeout", blocking_timeout,
                                                  allow_zero=True))
        self._client = client
        self._ns = ns
        self._token: str | None = None
        self._fence: int | None = None
        self._reserve = reserve

    def __repr__(self) -> str:
        return f"Lock({self.name!r}, held={self._token is not None}, fencing_token={self._fence})"

    @property
    def token(self) -> str | None:
        """The owner token while this object holds the lock, else None."""
        return self._token

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current (or last) acquisition."""
        return self._fence

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; return False when it could not be had in time.

        Raises
        ------
        StorageUnavailable
            Redis failed. After a timeout the lock may have been taken: the
            token is kept so that :meth:`release` can still free it.
        """
        if self._token is not None:
            raise errors.LockNotOwned(f"lock {self.name!r} is already held by this Lock")
        wait = self.blocking_timeout if timeout is None else validate.seconds(
            "timeout", timeout, allow_zero=True)
        deadline = None if wait is None else time.monotonic() + wait
        delay = 0.005
        while True:
            token = secrets.token_hex(16)
            self._token = token
            # On a StorageUnavailable the token stays: the script may have run,
            # and release() can still free the lock.
            fence = locks.acquire(self._client, self._ns, self.name, token, self._ttl_ms)
            if fence == locks.NEED_RESERVATION:
                fence = self._acquire_reserved(token)
            if fence > 0:
                self._fence = fence
                return True
            self._token = None
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False
            pause = delay * (0.5 + random.random())
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 2, 0.1)

    def _acquire_reserved(self, token: str) -> int:
        """Reserve fencing tokens in PostgreSQL (when Redis has none left), then acquire."""
        if self._reserve is None:
            raise errors.ConfigurationError("this Lock has no PostgreSQL reservation for fencing tokens")
        seen = locks.counter(self._client, self._ns, self.name)
        reservation = self._reserve(self.name, seen)
        return locks.acquire(self._client, self._ns, self.name, token, self._ttl_ms, reservation)

    def release(self) -> None:
        """Release the lock.

        Raises
        ------
        LockNotOwned
            This Lock does not hold it (never acquired, released already, or expired
            and taken by another owner). No other owner's lock is ever released.
        """
        token = self._token
        if token is None:
            raise errors.LockNotOwned(f"lock {self.name!r} is not held by this Lock")
        self._token = None
        if not locks.release(self._client, self._ns, self.name, token):
            raise errors.LockNotOwned(f"lock {self.name!r} expired and is no longer held by this Lock")

    def extend(self, ttl: float | None = None) -> None:
        """Hold the lock for ``ttl`` more seconds from now (default: the lock's TTL).

        Raises
        ------
        LockNotOwned
            The lock is no longer held by this Lock.
        """
        ms = self._ttl_ms if ttl is None else max(1, int(validate.seconds("ttl", ttl) * 1000))
        token = self._token
        if token is None or not locks.extend(self._client, self._ns, self.name, token, ms):
            raise errors.LockNotOwned(f"lock {self.name!r} is not held by this Lock")

    def locked(self) -> bool:
        """Whether anyone holds the lock now."""
        return locks.owner(self._client, self._ns, self.name) is not None

    def owned(self) -> bool:
        """Whether this Lock holds the lock now."""
        return self._token is not None and locks.owner(self._client, self._ns, self.name) == self._token

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise errors.LockNotOwned(
                f"could not acquire lock {self.name!r} within {self.blocking_timeout}s")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
