"""Prometheus exposition of an Inspector: ``render(inspector)`` and a small ``/metrics`` server.

Families (every sample is read through the Inspector, so it is read-only):

``toolkit_<metric>_total`` (counter)
    Each metric counter, as ``max(Redis value, PostgreSQL checkpoint)``: the
    checkpoint keeps it monotonic after Redis loses its data. Characters a
    Prometheus name cannot hold become ``_``.
``toolkit_queue_depth{queue, priority}`` (gauge)
    Jobs waiting in each queue at each priority (in-flight pops excluded).
``toolkit_queue_paused{queue}`` (gauge)
    1 for a queue an operator paused (no job of it is handed out), 0 for one with jobs
    waiting and no pause.
``toolkit_queue_oldest_age_seconds{queue}``, ``toolkit_queue_enqueue_rate{queue}``,
``toolkit_queue_dispatch_rate{queue}``, ``toolkit_queue_drain_eta_seconds{queue}`` (gauges)
    ``Inspector.backlog()``: the oldest queued job's age, jobs in and out per second over
    the last 15 minutes, and the time to empty the queue at that pace (no sample while
    the queue is not shrinking).
``toolkit_queue_scheduled{queue}``, ``toolkit_queue_next_due_timestamp_seconds{queue}`` (gauges)
    ``Inspector.backlog()``: queued jobs whose ``run_at`` is in the future (scheduled, or a
    retry backing off), and the unix time the soonest of them is due (no sample when none).
``toolkit_jobs_in_flight`` (gauge)
    Jobs popped from a queue whose assignment is not yet committed.
``toolkit_workers{state}`` (gauge)
    Workers ``alive`` (active with a fresh heartbeat), ``unresponsive``
    (active, heartbeat older than the TTL) and ``inactive``.
``toolkit_jobs{status}`` (gauge)
    Jobs per status, every status present.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from toolkit import models

PREFIX = "toolkit"


def metric_name(name: str) -> str:
    """A counter name made safe for Prometheus (``[a-zA-Z_:][a-zA-Z0-9_:]*``)."""
    safe = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return f"{PREFIX}_{safe}"


class InspectorCollector(Collector):
    """A ``prometheus_client`` collector that reads an Inspector on every scrape."""

    def __init__(self, inspector: Any) -> None:
        self.inspector = inspector

    def collect(self) -> Iterator[Metric]:
        """Yield the counter and gauge families described in the module docstring."""
        yield from self._counters()
        yield from self._queue()
        yield self._paused()
        yield from self._backlog()
        yield self._workers()
        yield self._jobs()

    def _counters(self) -> Iterator[Metric]:
        m = self.inspector.metrics()
        seen: set[str] = set()
        for name, row in m.iterrows():
            value = max(_count(row["value"]), _count(row["checkpoint"]))
            prom = metric_name(str(name))
            if prom in seen:
                continue
            seen.add(prom)
            family = CounterMetricFamily(prom, f"toolkit counter {name!r} (max of Redis and its "
                                         "PostgreSQL checkpoint)")
            family.add_metric([], value)
            yield family

    def _queue(self) -> Iterator[Metric]:
        q = self.inspector.queue()
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "jobs waiting, per queue and priority",
                                  labels=["queue", "priority"])
        waiting = q[~q["in_flight"].astype(bool)] if len(q) else q
        if len(waiting):
            sizes = waiting.groupby(["queue", "priority"], observed=True).size()
            for (queue, priority), n in sizes.items():
                depth.add_metric([str(queue), str(int(priority))], float(n))
        yield depth
        flight = GaugeMetricFamily(f"{PREFIX}_jobs_in_flight",
                                   "jobs popped whose assignment is not committed yet")
        flight.add_metric([], float(q["in_flight"].astype(bool).sum()) if len(q) else 0.0)
        yield flight

    def _backlog(self) -> Iterator[Metric]:
        b = self.inspector.backlog()
        for column, name, text in (
                ("oldest_age_s", "queue_oldest_age_seconds", "age of the oldest queued job"),
                ("enqueued_per_s", "queue_enqueue_rate", "jobs entering the queue per second (15 min)"),
                ("dispatched_per_s", "queue_dispatch_rate", "jobs handed out per second (15 min)"),
                ("drain_eta_s", "queue_drain_eta_seconds",
                 "seconds to empty the queue at the current pace (absent when not shrinking)")):
            family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=["queue"])
            for queue_name, value in b[column].items():
                if not pd.isna(value):
                    family.add_metric([str(queue_name)], float(value))
            yield family
        scheduled = GaugeMetricFamily(f"{PREFIX}_queue_scheduled", "queued jobs whose run_at is "
                                      "in the future (scheduled or backing off)", labels=["queue"])
        due = GaugeMetricFamily(f"{PREFIX}_queue_next_due_timestamp_seconds", "unix time the "
                                "soonest scheduled job is due (absent when none)", labels=["queue"])
        for queue_name, row in b.iterrows():
            scheduled.add_metric([str(queue_name)], float(row["scheduled"]))
            if not pd.isna(row["next_due"]):
                due.add_metric([str(queue_name)], row["next_due"].timestamp())
        yield scheduled
        yield due

    def _paused(self) -> Metric:
        family = GaugeMetricFamily(f"{PREFIX}_queue_paused", "1 when an operator paused the "
                                   "queue (it hands out no job)", labels=["queue"])
        for name, row in self.inspector.queues().iterrows():
            family.add_metric([str(name)], 1.0 if bool(row["paused"]) else 0.0)
        return family

    def _workers(self) -> Metric:
        w = self.inspector.workers()
        family = GaugeMetricFamily(f"{PREFIX}_workers", "workers by state", labels=["state"])
        active = w["status"] == "active"
        alive = w["alive"].fillna(False).astype(bool)
        counts = {"alive": int((active & alive).sum()), "unresponsive": int((active & ~alive).sum()),
                  "inactive": int((~active).sum())}
        for state, n in counts.items():
            family.add_metric([state], float(n))
        return family

    def _jobs(self) -> Metric:
        s = self.inspector.summary()["value"]
        family = GaugeMetricFamily(f"{PREFIX}_jobs", "jobs per status", labels=["status"])
        for status in models.JobStatus:
            family.add_metric([status.value], float(s.get(f"jobs_{status.value}", 0.0)))
        return family


def _count(value: Any) -> int:
    return 0 if pd.isna(value) else int(value)


def render(inspector: Any) -> str:
    """The Prometheus text format (version 0.0.4) of ``inspector``'s state.

    A fresh ``CollectorRegistry`` per call, so nothing is shared between renders.
    Works on a live Inspector and on a snapshot.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InspectorCollector(inspector))
    return generate_latest(registry).decode("utf-8")


def make_server(inspector: Any, host: str = "127.0.0.1", port: int = 9464) -> ThreadingHTTPServer:
    """An HTTP server answering ``GET /metrics`` with :func:`render` (call ``serve_forever()``).

    Binds to loopback by default; ``port=0`` picks a free port (``server.server_address``).
    Any other path is a 404. A scrape that fails answers 503 with the error's class name.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self._send(404, b"not found: try /metrics\n", "text/plain")
                return
            try:
                body = render(inspector).encode("utf-8")
            except Exception as exc:  # noqa: BLE001 - a scrape must answer, not hang
                self._send(503, f"scrape failed: {type(exc).__name__}\n".encode(), "text/plain")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
