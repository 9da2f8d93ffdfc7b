"""The ingress's dispatcher over fake replicas, in-process (no Ray, no model): batch lines leased to a
replica that dies run again on another and are answered once; offline work waits while every replica's
online objectives are at risk; a request whose replica is lost gets a 503 error object; replicas'
metrics come through labelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest

from conserve.cluster.dispatch import Dispatcher, ReplicaLost
from conserve.cluster.metrics import ClusterMetrics, with_replica_label
from conserve.cluster.wire import Accepted, EngineFault, Head
from conserve.request import RequestClass
from conserve.server.batches import BatchRunner
from conserve.server.errors import APIError
from conserve.server.store import Store
from test_batch_faults import answer, docs, fast_retry
from test_batch_store import CHAT, output_ids, put_file, requests, wait_status
from test_cluster_router import stats


class FakeReplica:
    """Answers batch lines (or holds them until `release`); `kill()` fails what it holds and every later
    call with ReplicaLost, as a dead Ray actor does."""

    def __init__(self, name: str, hold: bool = False, **report) -> None:
        self.name, self.hold, self.report = name, hold, report
        self.calls: Counter[str] = Counter()
        self.held = 0
        self.dead = False
        self.unreachable = False
        self.release = asyncio.Event()

    def kill(self) -> None:
        self.dead = True
        self.release.set()

    def _check(self) -> None:
        if self.dead:
            raise ReplicaLost(f"{self.name} is dead")

    async def stats(self):
        self._check()
        return stats(self.name, **self.report)

    async def execute(self, endpoint: str, body: dict, deadline: float | None):
        self._check()
        text = body["messages"][-1]["content"]
        self.calls[text] += 1
        if self.hold:
            self.held += 1
            await self.release.wait()
            self._check()
        return answer(f"{self.name} {text}")

    async def request(self, endpoint: str, body: dict):
        if self.unreachable:  # a call to a process that died unnoticed: Ray Serve holds it for a restart
            self.held += 1
            await asyncio.Event().wait()
        self._check()
        yield Accepted()
        if self.hold:  # a non-streamed request: its Head comes when it is done
            await self.release.wait()
            self._check()
        yield Head(200, None)
        yield "data: 1\n\n"
        await self.release.wait()
        self._check()
        yield "data: [DONE]\n\n"

    async def metrics_text(self) -> bytes:
        self._check()
        return b'# HELP conserve_requests_total x\n# TYPE conserve_requests_total counter\n' \
               b'conserve_requests_total{request_class="online"} 3.0\n'


@contextlib.asynccontextmanager
async def running(*replicas: FakeReplica, **kw):
    """A started dispatcher over these replicas, once each has reported; closed on the way out."""
    d = Dispatcher({r.name: r for r in replicas}, ClusterMetrics(), poll_s=0.001, **kw)
    await d.start()
    try:
        await until(lambda: all(d.router.is_up(r.name) for r in replicas))
        yield d
    finally:
        await d.close()


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_lines_leased_to_a_replica_that_dies_run_again_elsewhere_once(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(12))
    a, b = FakeReplica("a", hold=True, offline_capacity=300.0), FakeReplica("b", hold=True)

    async def main():
        async with running(a, b) as d:
            runner = BatchRunner(store, d.execute_line, max_concurrency=6, retry=fast_retry())
            await runner.start()
            try:
                batch = await runner.create(f.id, CHAT)
                await until(lambda: a.held + b.held == 6)
                assert (a.held, b.held) == (5, 1)  # capacity per line in flight: 300, 150, 100 (b), 100, 75, 60
                leased_on_a = a.held
                a.kill()
                b.hold = False
                b.release.set()
                return await wait_status(store, batch.id, ("completed",)), leased_on_a, d.metrics
            finally:
                await runner.shutdown()

    done, leased_on_a, metrics = asyncio.run(main())
    assert (done.completed, done.failed) == (12, 0)
    assert output_ids(store, done.output_file_id) == [f"q{i}" for i in range(12)]
    texts = [d["response"]["body"]["choices"][0]["message"]["content"] for d in docs(store, done.output_file_id)]
    assert all(t.startswith("echo b ") for t in texts)  # every answer came from the survivor
    assert sum(a.calls.values()) == leased_on_a and sum(b.calls.values()) == 12  # a's leases ran again on b
    assert metrics.released.labels("a")._value.get() == leased_on_a
    store.close()


def test_an_engine_fault_in_a_replica_is_a_lost_lease_too(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(3))
    faults = {"q1": 1}

    class Faulty(FakeReplica):
        async def execute(self, endpoint, body, deadline):
            text = body["messages"][-1]["content"]
            if faults.get(text):
                faults[text] -= 1
                return EngineFault("boom")
            return await super().execute(endpoint, body, deadline)

    async def main():
        async with running(Faulty("a")) as d:
            runner = BatchRunner(store, d.execute_line, retry=fast_retry())
            await runner.start()
            try:
                return await wait_status(store, (await runner.create(f.id, CHAT)).id, ("completed",))
            finally:
                await runner.shutdown()

    done = asyncio.run(main())
    assert (done.completed, done.failed) == (3, 0) and faults == {"q1": 0}
    store.close()


def test_offline_work_waits_while_every_replica_is_at_risk():
    a = FakeReplica("a", online_queue_s=0.9)  # online queue past half the TTFT objective

    async def main():
        async with running(a) as d:
            line = asyncio.create_task(d.execute_line(CHAT, {"messages": [{"role": "user", "content": "x"}]}, None))
            flex = asyncio.create_task(d.open(CHAT, {}, RequestClass.OFFLINE, 10))
            await asyncio.sleep(0.05)
            assert not line.done() and not flex.done() and not a.calls
            assert d.metrics.offline_held._value.get() == 2
            online = await d.open(CHAT, {}, RequestClass.ONLINE, 10)  # online is never held back
            assert (online.replica, online.head.status) == ("a", 200)
            await online.close()
            a.report["online_queue_s"] = 0.0  # the next report clears the risk
            assert await line == answer("a x") and a.calls["x"] == 1
            flex = await flex
            assert (flex.replica, flex.head.status) == ("a", 200) and d.router.offline_in_flight("a") == 1
            await flex.close()  # its lines never read (a client gone at once): still counted out
            assert d.router.offline_in_flight("a") == 0

    asyncio.run(main())


def test_a_request_whose_replica_is_lost_gets_503_and_the_next_goes_elsewhere():
    a, b = FakeReplica("a"), FakeReplica("b", online_queue_s=0.3)

    async def main():
        async with running(a, b) as d:
            first = await d.open(CHAT, {}, RequestClass.ONLINE, 10)
            lines = first.lines()
            assert first.replica == "a" and await anext(lines) == "data: 1\n\n"
            a.kill()  # mid-stream: the ingress turns this into an in-band error event
            with pytest.raises(ReplicaLost):
                await anext(lines)
            assert not d.router.is_up("a")
            second = await d.open(CHAT, {}, RequestClass.ONLINE, 10)
            assert second.replica == "b"
            await second.close()
            b.hold = True  # accepted, answering when done (not streamed), and dies meanwhile: 503
            in_flight = asyncio.create_task(d.open(CHAT, {}, RequestClass.ONLINE, 10))
            await asyncio.sleep(0.01)
            b.kill()
            with pytest.raises(APIError) as lost:
                await in_flight
            with pytest.raises(APIError) as none_up:
                await d.open(CHAT, {}, RequestClass.ONLINE, 10)
            return lost.value, none_up.value, d.metrics

    lost, none_up, metrics = asyncio.run(main())
    assert (lost.status, lost.code, lost.headers) == (503, "replica_lost", {"Retry-After": "1"})
    assert (none_up.status, none_up.code) == (503, "no_replica_available")
    assert metrics.lost.labels("a")._value.get() == 1 and metrics.lost.labels("b")._value.get() == 1


def test_a_request_sent_to_a_replica_that_died_unnoticed_goes_elsewhere_once_it_is_found_down():
    a, b = FakeReplica("a"), FakeReplica("b", online_queue_s=0.3)

    async def main():
        async with running(a, b) as d:
            a.unreachable = True
            request = asyncio.create_task(d.open(CHAT, {}, RequestClass.ONLINE, 10))
            await until(lambda: a.held == 1)  # sent to a, which never accepts it
            a.dead = True  # its stats poll fails: a is down
            answer = await request
            await answer.close()
            return answer, d.metrics

    answer, metrics = asyncio.run(main())
    assert (answer.replica, answer.head.status) == ("b", 200)
    assert metrics.routed.labels("a", "online", "http")._value.get() == 1
    assert metrics.routed.labels("b", "online", "http")._value.get() == 1


def test_flex_requests_beyond_the_waiting_limit_get_429():
    a = FakeReplica("a", online_step_s=1.0)  # at risk: offline work waits

    async def main():
        async with running(a, max_waiting_flex=1) as d:
            waiting = asyncio.create_task(d.open(CHAT, {}, RequestClass.OFFLINE, 10))
            await asyncio.sleep(0.01)
            with pytest.raises(APIError) as e:
                await d.open(CHAT, {}, RequestClass.OFFLINE, 10)
            waiting.cancel()
            return e.value

    error = asyncio.run(main())
    assert error.status == 429 and error.code == "queue_full"


def test_replica_metrics_are_merged_with_a_replica_label():
    body = (b'# HELP conserve_requests_total x\n# TYPE conserve_requests_total counter\n'
            b'conserve_requests_total{request_class="online"} 3.0\n'
            b'# HELP conserve_http_errors_total e\n# TYPE conserve_http_errors_total counter\n')
    merged = with_replica_label({"engine-0": body, "engine-1": body}, skip={"conserve_http_errors"}).decode()
    assert merged.count("# TYPE conserve_requests_total counter") == 1
    assert 'conserve_requests_total{replica="engine-0",request_class="online"} 3.0' in merged
    assert 'conserve_requests_total{replica="engine-1",request_class="online"} 3.0' in merged
    assert "conserve_http_errors" not in merged
