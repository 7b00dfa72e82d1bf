"""Server-side prepared statements where the connection allows them (issue 18, item 4).

On a direct connection psycopg prepares a statement after it ran PREPARE_THRESHOLD times;
through anything in between (PgBouncer, a proxy: the server's port is not the one the client
dialled) nothing is prepared unless ``TOOLKIT_PG_PREPARE=on``. ``tests/reliability/
test_pgbouncer.py`` runs the whole state layer through a stock PgBouncer in transaction mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.conftest import Servers
from toolkit import config, errors
from toolkit.faults import TcpProxy
from toolkit.tiers.postgres import db as pg_db


@pytest.fixture
def proxy(clean: Servers) -> Iterator[TcpProxy]:
    p = TcpProxy(*TcpProxy.to_url(clean.database_url).target).start()
    try:
        yield p
    finally:
        p.cut()


def _prepared_after_runs(url: str, schema: str) -> tuple[object, list[str]]:
    """The connection's threshold, and the statements the server holds prepared for it after
    one query ran past the threshold."""
    db = pg_db.Database(url, schema, pool_size=1)
    try:
        with db.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            for _ in range(pg_db.PREPARE_THRESHOLD + 2):
                conn.execute(sa.text("SELECT 41 + 1 AS answer")).scalar_one()
            held = [r[0] for r in conn.execute(sa.text("SELECT statement FROM pg_prepared_statements"))]
            return raw.prepare_threshold, held
    finally:
        db.dispose()


def test_a_direct_connection_prepares_hot_statements(clean: Servers,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    threshold, held = _prepared_after_runs(clean.database_url, clean.schema)
    assert threshold == pg_db.PREPARE_THRESHOLD
    assert any("41 + 1" in s for s in held), held


def test_nothing_is_prepared_through_something_in_between(
        clean: Servers, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    threshold, held = _prepared_after_runs(proxy.url_for(clean.database_url), clean.schema)
    assert threshold is None and not any("41 + 1" in s for s in held), held


@pytest.mark.parametrize("mode,expected", [("on", pg_db.PREPARE_THRESHOLD), ("off", None)])
def test_the_setting_overrides_the_detection(clean: Servers, proxy: TcpProxy,
                                             monkeypatch: pytest.MonkeyPatch,
                                             mode: str, expected: int | None) -> None:
    monkeypatch.setenv(config.PG_PREPARE_VAR, mode)
    url = clean.database_url if mode == "off" else proxy.url_for(clean.database_url)
    threshold, held = _prepared_after_runs(url, clean.schema)
    assert threshold == expected and any("41 + 1" in s for s in held) == (mode == "on")


def test_a_bad_setting_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.PG_PREPARE_VAR, "sometimes")
    with pytest.raises(errors.ConfigurationError, match="TOOLKIT_PG_PREPARE must be auto, on or off"):
        config.pg_prepare_mode()
    assert config.pg_prepare_mode({config.PG_PREPARE_VAR: " ON "}) == "on"
    assert config.pg_prepare_mode({}) == "auto"
