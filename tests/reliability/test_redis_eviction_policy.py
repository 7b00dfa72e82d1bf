"""A Redis that can lose our keys is named at start (issue 17, item 4).

Injected: private redis-servers started with ``maxmemory-policy allkeys-lru``
(no limit; then a limit just above used memory), and one whose ACL user may not
run CONFIG. Checked: a logged warning (an error near the limit), a finding in
``check_consistency().warnings`` and in ``toolkit check``'s output (exit 0: a
finding, not a disagreement), ``ConfigurationError`` in strict mode, and for
the ACL case one warning and a working manager. The shared loopback Redis is
never reconfigured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import toolkit
import toolkit.cli
from tests.conftest import Servers, drop_schema, unique
from tests.reliability.private_redis import RedisServer, redis_server


@pytest.fixture
def schema(servers: Servers) -> Iterator[str]:
    """A fresh schema (and namespace name) on the shared PostgreSQL."""
    name = unique("tk_evict")
    yield name
    drop_schema(servers.libpq_url, name)


def _findings(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and "eviction" in r.name]


def test_an_evicting_policy_is_warned_reported_by_check_and_refused_when_strict(
        servers: Servers, schema: str, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    with redis_server("--maxmemory-policy", "allkeys-lru") as rd:
        caplog.set_level(logging.INFO)
        with toolkit.init_state_manager(servers.database_url, rd.url, namespace=schema,
                                        schema=schema) as sm:
            sm.create_workflow("w", jobs=[{"name": "a"}])
            assert [m for m in _findings(caplog, logging.WARNING) if "allkeys-lru" in m]
            assert sm.eviction_risk is not None and sm.eviction_risk.policy == "allkeys-lru"
            report = sm.check_consistency()
            assert report.ok and len(report.warnings) == 1
            assert "allkeys-lru" in report.warnings[0] and "as soon as a maxmemory" in str(report)
            with toolkit.Inspector(servers.database_url, rd.url, namespace=schema,
                                   schema=schema) as ins:
                caplog.clear()
                ins.tiers()
                assert [m for m in _findings(caplog, logging.WARNING) if "allkeys-lru" in m]
        code = toolkit.cli.main(["check", "--database-url", servers.database_url, "--redis-url",
                                 rd.url, "--namespace", schema, "--schema", schema])
        out, _ = capsys.readouterr()
        assert code == toolkit.cli.EXIT_OK and "warning: " in out and "allkeys-lru" in out, out
        code = toolkit.cli.main(["check", "--format", "json", "--database-url",
                                 servers.database_url, "--redis-url", rd.url,
                                 "--namespace", schema, "--schema", schema])
        out, err = capsys.readouterr()
        assert code == toolkit.cli.EXIT_OK and "allkeys-lru" in err and "allkeys-lru" not in out
        with pytest.raises(toolkit.ConfigurationError, match="allkeys-lru"):
            toolkit.init_state_manager(servers.database_url, rd.url, namespace=schema,
                                       schema=schema, require_noeviction=True)


def test_used_memory_near_the_limit_is_an_error_not_a_warning(
        servers: Servers, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    with redis_server("--maxmemory-policy", "volatile-lru") as rd:
        with rd.raw() as admin:  # a private server: a limit just above what it uses now
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", str(int(used * 1.02)))
        caplog.set_level(logging.INFO)
        with toolkit.init_state_manager(servers.database_url, rd.url, namespace=schema,
                                        schema=schema, rebuild=False) as sm:
            errors_logged = _findings(caplog, logging.ERROR)
            assert errors_logged and "evicting, or about to evict" in errors_logged[0]
            assert sm.eviction_risk is not None and sm.eviction_risk.level == logging.ERROR
            assert "maxmemory" in sm.check_consistency().warnings[0]


def _acl_user(rd: RedisServer) -> str:
    with rd.raw() as admin:
        admin.execute_command("ACL", "SETUSER", "tk_noconfig", "on", ">pw-17", "~*", "&*",
                              "+@all", "-config")
    return f"redis://tk_noconfig:pw-17@127.0.0.1:{rd.port}/0"


def test_a_redis_that_hides_its_config_is_named_once_and_the_toolkit_goes_on(
        servers: Servers, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    with redis_server() as rd:
        url = _acl_user(rd)
        caplog.set_level(logging.INFO)
        with toolkit.init_state_manager(servers.database_url, url, namespace=schema,
                                        schema=schema, require_noeviction=True) as sm:
            said = _findings(caplog, logging.WARNING)
            assert len(said) == 1 and "does not let us read its eviction policy" in said[0]
            wf = sm.create_workflow("w", jobs=[{"name": "a"}])
            sm.memory.drop("workflow", wf.id)
            assert sm.get_workflow(wf.id) == wf
            report = sm.check_consistency()
            assert report.ok and "CONFIG" in report.warnings[0]
            assert "pw-17" not in report.warnings[0]


def test_a_noeviction_redis_gives_no_finding(sm: toolkit.StateManager) -> None:
    assert sm.eviction_risk is not None and sm.eviction_risk.policy == "noeviction"
    assert sm.eviction_risk.safe and sm.check_consistency().warnings == ()
