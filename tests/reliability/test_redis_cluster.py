"""The state layer on a 3-master Redis Cluster.

Issue 7, "Redis Cluster". Every key of a namespace carries the hash tag
``{ns}``, so all of them live in one slot (one master) and multi-key Lua
scripts stay legal; what a cluster needs from the client is to follow that slot
(``redis.cluster.RedisCluster``), not a plain ``redis.Redis`` that gets
``MOVED`` whenever the slot is on another node than the one in the URL.

The cluster URL is written ``redis://host:port/0?cluster=true`` (the toolkit
must recognise it). The namespaces below are chosen so their slot is served
by a node that is *not* the one in the URL, so a plain client cannot pass by luck.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

import toolkit
from tests.reliability import servers
from tests.reliability.conftest import Private, assert_rebuild_loaded_everything
from toolkit.tiers.redis import keys


@pytest.fixture(scope="module")
def cluster() -> Iterator[servers.Cluster]:
    with servers.redis_cluster(3) as c:
        yield c


def _cluster_url(cluster: servers.Cluster) -> str:
    return f"{cluster.url}?cluster=true"


def _foreign_namespace(cluster: servers.Cluster) -> str:
    """A fresh namespace whose slot is NOT served by the node named in the URL."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    try:
        for _ in range(1000):
            ns = f"tk_cl_{uuid.uuid4().hex[:8]}"
            node = client.get_node_from_key(keys.prefix(ns) + "x")
            if node.port != cluster.ports[0]:
                return ns
    finally:
        client.close()
    raise AssertionError("no namespace maps to another node")


def _manager(private: Private, cluster: servers.Cluster, ns: str) -> toolkit.StateManager:
    return toolkit.init_state_manager(private.database_url, _cluster_url(cluster), namespace=ns,
                                      schema=private.schema, heartbeat_ttl=1.0)


def test_cluster_url_is_accepted_and_masked(private: Private, cluster: servers.Cluster) -> None:
    url = f"redis://user:s3cret-pw@127.0.0.1:{cluster.ports[0]}/0?cluster=true"
    with pytest.raises(toolkit.ToolkitError) as info:  # no such ACL user: refused, not leaked
        toolkit.init_state_manager(private.database_url, url, namespace="x", schema=private.schema)
    assert "s3cret-pw" not in str(info.value)


def test_state_layer_essentials_on_a_redis_cluster(private: Private, cluster: servers.Cluster) -> None:
    ns = _foreign_namespace(cluster)
    with _manager(private, cluster, ns) as sm:
        wf = sm.create_workflow("cl", jobs=[{"name": "a", "priority": 3},
                                            {"name": "b", "depends_on": ["a"]}, {"name": "c"}])
        sm.register_worker("w1")
        sm.heartbeat("w1")
        a = sm.dequeue("w1")
        assert a is not None and a.name == "a"
        sm.start_job(a.id)
        sm.complete_job(a.id, {"ok": 1})
        nxt = sm.dequeue("w1")
        assert nxt is not None and nxt.name in {"b", "c"}
        sm.fail_job(nxt.id, "x", retry_in=0)  # retried at once: back in its queue
        with sm.lock("cl-lock", ttl=5) as lock:
            assert lock.fencing_token >= 1
            other = sm.lock("cl-lock", ttl=5, blocking_timeout=0.1)
            assert other.acquire() is False
        assert sm.incr_metric("cl_metric", 2) == 2
        assert sm.get_metric("cl_metric") == 2
        sm.checkpoint_metrics()
        report = sm.rebuild()
        assert_rebuild_loaded_everything(report, private.libpq_url, sm.settings.schema)
        assert sm.check_consistency().ok
        assert sm.active_workers() == ["w1"]
        # The keys really are in the cluster, in one slot on a node other than the URL's.
        raw = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
        try:
            q = keys.queue(ns, "default")
            assert raw.zcard(q) == 2, raw.zrange(q, 0, -1)
            assert raw.get_node_from_key(q).port != cluster.ports[0]
        finally:
            raw.close()
        # Redis lost (the namespace wiped), then repaired from PostgreSQL.
        _wipe(cluster, ns)
        assert not sm.check_consistency().ok
        assert not sm.repair().ok  # the report of what was wrong
        assert sm.check_consistency().ok
        assert sm.get_metric("cl_metric") == 2  # back from the PostgreSQL checkpoint
        ins = sm.inspector
        assert len(ins.jobs(workflow_id=wf.id)) == 3
        assert len(ins.queue()) == 2
        for frame in (ins.workflows, ins.workers, ins.assignments, ins.locks, ins.metrics,
                      ins.metric_series, ins.tiers, ins.summary):
            frame()


def test_invalidation_reaches_another_coordinator_on_the_cluster(
        private: Private, cluster: servers.Cluster) -> None:
    ns = _foreign_namespace(cluster)
    with _manager(private, cluster, ns) as one, _manager(private, cluster, ns) as two:
        wf = one.create_workflow("inv")
        assert two.get_workflow(wf.id) is not None  # now in two's memory
        one.update_workflow_status(wf.id, "running")
        deadline = time.monotonic() + 5
        while two.get_workflow(wf.id).status != "running":
            assert time.monotonic() < deadline, "invalidation not received on the cluster"
            time.sleep(0.05)


def _wipe(cluster: servers.Cluster, ns: str) -> None:
    for port in cluster.ports:
        node = redis.Redis(host="127.0.0.1", port=port)
        try:
            names = list(node.scan_iter(match=keys.namespace_pattern(ns), count=1000))
            for name in names:
                node.unlink(name)
        finally:
            node.close()
