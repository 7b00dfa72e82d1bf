"""The Redis connection, its retry policy, its scripts and its error translation.

redis-py re-sends a command after a timeout by default; for ``INCR`` or a Lua
pop that would count or pop twice. Our client is built with an explicit
policy of *no* automatic retry (``Retry(NoBackoff(), 0)``). Idempotent calls
(cache fills, ZADD, reads) may be retried once by :func:`call` on a broken
connection, which is what a restarted Redis looks like to a pooled client.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.commands import CoreCommands
from redis.commands.core import Script
from redis.crc import key_slot
from redis.retry import Retry

from toolkit import config, errors
from toolkit.tiers.redis import keys

log = logging.getLogger(__name__)
T = TypeVar("T")
Packable = bytes | str | int | float
"""An argument :meth:`Client.send_packed` sends as is (str as UTF-8, numbers as text)."""

SCRIPT_NAMES = (
    "set_if_newer",
    "set_many_if_newer",
    "claim_job",
    "claim_jobs",
    "return_inflight",
    "acquire_lock",
    "release_lock",
    "extend_lock",
    "incr_metric",
    "incr_metrics",
    "raise_metrics",
    "beat_workers",
    "promote_due",
    "drop_unchanged",
    "take_unchanged",
)


class _HiredisPacker:
    """Packs every command of a connection with one ``hiredis.pack_command`` call.

    redis-py's own packer (``HiredisRespSerializer``) checks and encodes each
    argument in Python before handing them to hiredis; in the one-job worker
    loop that was a seventh of the process's CPU time (about 60 arguments per
    job, mostly the cache fill's). hiredis takes str (always as UTF-8: the
    toolkit's clients set no other encoding), bytes, int and float itself. As
    redis-py's, it splits a command name such as ``"SCRIPT LOAD"`` and refuses
    None and bool with ``DataError``; unlike it, it refuses an int subclass
    such as an ``IntEnum`` too (redis-py sent its ``repr``).
    """

    @staticmethod
    def pack(*args: Any) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) and " " in head:
            args = (*head.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise redis.DataError(f"{exc} (in a {head!r} command)") from None


_PACKER = _HiredisPacker()


class Client:
    """A redis-py client plus the registered Lua scripts of the toolkit.

    Parameters
    ----------
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL. With ``?cluster=true`` the
        URL names any node of a Redis Cluster: every key of a namespace shares
        one hash slot (the ``{ns}`` tag), so the client talks to the master that
        owns that slot and follows it when the slot moves.
    socket_timeout
        Seconds to wait for a reply before the call fails (never re-sent).
    read_only
        An Inspector's client: no scripts are registered.
    namespace
        The namespace whose slot a cluster client follows.
    """

    def __init__(self, url: str, *, socket_timeout: float = 5.0, read_only: bool = False,
                 namespace: str | None = None) -> None:
        self.url = url
        self.where = config.host_port(url)
        url, cluster = split_cluster(url)
        self._slot = key_slot(keys.prefix(namespace or "").encode()) if cluster else None
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
            command_packer=_PACKER,
        )
        self.scripts: dict[str, Script] = {}
        self._scripts_loaded = False
        if not read_only:
            for name in SCRIPT_NAMES:
                self.scripts[name] = self.redis.register_script(script_text(name))
        if self._slot is not None:
            with self.translate("find the cluster node of the namespace"):
                self._follow_slot()

    def _follow_slot(self) -> None:
        """Point the pool at the cluster master that owns the namespace's slot."""
        for start, end, master, *_ in self.redis.execute_command("CLUSTER", "SLOTS"):
            if start <= self._slot <= end:
                pool = self.redis.connection_pool
                pool.connection_kwargs.update(host=str(master[0]), port=int(master[1]))
                pool.reset()  # pooled connections remember their host: drop them
                self.where = f"{master[0]}:{master[1]}"
                self._scripts_loaded = False  # that node may not have our scripts yet
                return
        raise redis.ResponseError(f"no cluster node serves slot {self._slot}")

    def __repr__(self) -> str:
        return f"Client({config.mask_url(self.url)!r})"

    def pipeline(self) -> Any:
        """A non-transactional pipeline that skips redis-py's per-execute ``SCRIPT EXISTS``.

        The scripts are loaded once per connection epoch (:meth:`load_scripts`);
        after a connection error or a ``NOSCRIPT`` reply they are loaded again
        before the next pipeline, so a restarted Redis costs one round trip, not
        one per write.
        """
        if not self._scripts_loaded and self.scripts:
            self.call("load scripts", self.load_scripts)
        pipe = self.redis.pipeline(transaction=False)
        pipe.load_scripts = lambda: None
        return pipe

    def load_scripts(self) -> None:
        """Load every Lua script into Redis (one round trip)."""
        loader = self.redis.pipeline(transaction=False)
        for script in self.scripts.values():
            loader.script_load(script.script)
        loader.execute()
        self._scripts_loaded = True

    def close(self) -> None:
        """Close every pooled connection."""
        self.redis.close()

    @contextlib.contextmanager
    def translate(self, action: str) -> Iterator[None]:
        """Turn any redis-py error raised inside into :class:`StorageUnavailable`."""
        try:
            yield
        except redis.RedisError as exc:
            if isinstance(exc, redis.ConnectionError | redis.exceptions.NoScriptError) or (
                    "NOSCRIPT" in str(exc)):
                self._scripts_loaded = False  # a new server, or flushed scripts: load them again
            said = config.scrub(f"{type(exc).__name__}: {exc}", self.url)
            if isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError) or (
                    "NOPERM" in str(exc) or "NOAUTH" in str(exc)):
                raise errors.SetupError(
                    f"Redis at {self.where} answered during {action}: {said}; check the user "
                    "and password in the Redis URL and its ACL") from exc
            raise errors.StorageUnavailable(
                f"Redis at {self.where} failed during {action}: {said}") from exc

    def call(self, action: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run ``fn`` against Redis, translating errors.

        An idempotent call is tried once more after a connection error (a
        pooled connection to a Redis that restarted fails once); a call that
        is not idempotent, or that timed out, is never re-sent.
        """
        with self.translate(action):
            try:
                return fn()
            except redis.exceptions.MovedError:
                if self._slot is None:
                    raise
                self._follow_slot()  # the slot moved (resharding or failover)
                if not idempotent:
                    raise
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

    def commands(self) -> Commands:
        """An empty :class:`Commands` for :meth:`send_commands` (the scripts loaded, as
        :meth:`pipeline` does)."""
        if not self._scripts_loaded and self.scripts:
            self.call("load scripts", self.load_scripts)
        return Commands()

    def send_commands(self, commands: Commands) -> list[Any]:
        """Send what ``commands`` wrote down in one round trip; return each reply.

        A script Redis does not know (``NOSCRIPT``: a restarted or flushed server
        whose connection redis-py replaced quietly) ran nothing, so the scripts
        are loaded and those calls alone are sent again. Any other error reply
        raises, after every reply was read (the connection stays usable), though
        Redis ran the other commands. Call it through :meth:`call`.
        """
        if not commands.commands:
            return []
        replies = self.send_packed(commands.commands, raise_on_error=False)
        unknown = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if unknown:
            self.load_scripts()
            again = self.send_packed([commands.commands[i] for i in unknown], raise_on_error=False)
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        _raise_first_error(replies)
        return replies

    def evalsha(self, name: str, keys: Sequence[str], args: Sequence[Packable]) -> Any:
        """Run a registered script in one round trip (loading the scripts first when Redis
        does not know them: a restarted or flushed server)."""
        command = self.commands()
        command.execute_command("EVALSHA", script_sha(name), len(keys), *keys, *args)
        return self.send_commands(command)[0]

    def send_packed(self, commands: Sequence[Sequence[Packable]], *,
                    raise_on_error: bool = True) -> list[Any]:
        """Send ``commands`` (each a list of arguments) back to back, then read their replies.

        hiredis packs each command in one C call (:class:`_HiredisPacker`), and
        the replies are read straight from the connection: none of redis-py's
        per-command work (its command stack, reply callbacks and
        instrumentation). Every reply is read, so the connection stays usable
        after an error reply; the first one raises then (``raise_on_error``;
        otherwise the error takes its command's place in the list). A lost or
        timed-out connection is dropped. Call it through :meth:`call`.
        """
        packed = [chunk for c in commands for chunk in _PACKER.pack(*c)]
        if len(packed) > 1 and sum(map(len, packed)) <= _JOIN_UP_TO:
            packed = [b"".join(packed)]  # redis-py sends each item with a syscall of its own
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(packed)
            replies = [_reply(conn) for _ in commands]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if raise_on_error:
            _raise_first_error(replies)
        return replies


_JOIN_UP_TO = 1 << 16
"""Bytes up to which :meth:`Client.send_packed` joins its commands into one buffer (the
rebuild's bulk commands, larger, go out as they are)."""


def _raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error reply of ``replies`` (read by :func:`_reply`), if any."""
    failed = next((r for r in replies if isinstance(r, redis.ResponseError)), None)
    if failed is not None:
        raise failed


def _reply(conn: Any) -> Any:
    """The next reply on ``conn``; an error reply returned, not raised."""
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc


class Commands(CoreCommands):
    """Redis commands written down, not sent: redis-py's own command methods
    (``zadd``, ``publish``, ``evalsha`` ...) build each one's arguments, and
    :meth:`Client.send_commands` sends them all in one round trip.

    The write path's one Redis update per change goes this way: through a
    redis-py pipeline it cost 207 us of client CPU per job in the one-job
    worker loop, this way 167-172 us (that pipeline's per-command bookkeeping).
    """

    _event_dispatcher: Any = None  # redis-py's connection events: none here

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> Commands:
        self.commands.append(args)
        return self


def split_cluster(url: str) -> tuple[str, bool]:
    """Return ``url`` without its ``cluster=`` query flag, and whether the flag was true."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [v for k, v in query if k == "cluster"]
    if not flags:
        return url, False
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    return urlunsplit(parts._replace(query=rest)), flags[-1].lower() in {"1", "true", "yes", "on"}


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    """Yield ``items`` in slices of at most ``size`` (so no one command or script grows unbounded)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@functools.cache
def script_text(name: str) -> str:
    """Return the text of a packaged Lua script (``scripts/<name>.lua``)."""
    pkg = resources.files("toolkit.tiers.redis") / "scripts"
    return (pkg / f"{name}.lua").read_text(encoding="utf-8")


@functools.cache
def script_sha(name: str) -> str:
    """Return the SHA1 Redis knows a registered script by (as ``Script.sha``)."""
    return hashlib.sha1(script_text(name).encode("utf-8"), usedforsecurity=False).hexdigest()


def queue_script(pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
    """Queue a registered script on a pipeline from :meth:`Client.pipeline`.

    That pipeline has already loaded every script of :data:`SCRIPT_NAMES`, so
    this needs no :class:`Client`; a ``NOSCRIPT`` reply makes the next
    pipeline load them again.
    """
    pipe.evalsha(script_sha(name), len(keys), *keys, *args)


def run_script(
    client: Client, name: str, keys: list[str], args: list[Any], *, pipe: Any = None
) -> Any:
    """Run a registered script, on ``pipe`` when given (then nothing is returned yet)."""
    if isinstance(pipe, Commands):
        return queue_script(pipe, name, keys, args)
    if pipe is not None:
        return client.script(name)(keys=keys, args=args, client=pipe)
    return client.evalsha(name, keys, args)
