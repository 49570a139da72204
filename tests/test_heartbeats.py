"""modelyard's flow runs keep Prefect's heartbeats and end without waiting for the heartbeat thread
(``flows/heartbeats.py``), on real flow runs of Prefect's test harness."""

from __future__ import annotations

import inspect
import threading

import pytest
from prefect import flow, flow_engine
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401 - Prefect's own event capture

from flows import heartbeats
from flows.pipeline import run_pipeline
from flows.shards import run_shards

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _heartbeat_thread(before: set[threading.Thread]) -> threading.Thread:
    """The heartbeat thread Prefect started for the flow run being executed (started after ``before``)."""
    found = [t for t in threading.enumerate() if t not in before and any(
        getattr(a, "__qualname__", "").endswith("heartbeat_loop") for a in getattr(t, "_args", ()))]
    assert len(found) == 1, found
    return found[0]


def _run(name: str) -> tuple[threading.Thread, list[str], str]:
    """Run a flow called ``name``; its heartbeat thread, the timeouts Prefect joined it with, its run id."""
    before = set(threading.enumerate())
    joins: list = []
    seen: dict = {}

    @flow(name=name)
    def probe() -> str:
        from prefect.runtime import flow_run

        thread = seen["thread"] = _heartbeat_thread(before)
        real = thread.join
        thread.join = lambda timeout=None: (joins.append(timeout), real(timeout))[1]
        return flow_run.id

    run_id = probe()
    return seen["thread"], joins, run_id


def _heartbeats(worker, run_id: str) -> list:
    worker.drain()
    return [e for e in worker._client.events
            if e.event == "prefect.flow-run.heartbeat" and e.resource.id == f"prefect.flow-run.{run_id}"]


def test_modelyard_flows_are_the_ones_that_do_not_wait():
    assert {run_pipeline.name, run_shards.name} == heartbeats.FLOWS
    assert flow_engine._send_heartbeats is heartbeats._send_heartbeats  # importing the flows installed it


@pytest.mark.parametrize("name", sorted(heartbeats.FLOWS))
def test_a_modelyard_flow_run_sends_its_heartbeat_and_ends_without_joining_the_thread(name, asserting_events_worker):  # noqa: F811
    thread, joins, run_id = _run(name)
    assert joins == []  # the run returned without waiting for the thread's next second
    assert _heartbeats(asserting_events_worker, run_id), "no heartbeat event for the flow run"
    thread.join(timeout=5)
    assert not thread.is_alive(), "the heartbeat thread did not stop by itself"


def test_any_other_flow_keeps_prefects_join(asserting_events_worker):  # noqa: F811
    thread, joins, run_id = _run("someone-elses-flow")
    assert joins == [2]  # prefect.flow_engine._send_heartbeats: thread.join(timeout=2)
    assert not thread.is_alive()
    assert _heartbeats(asserting_events_worker, run_id)


def test_prefect_still_sleeps_in_whole_seconds_in_its_heartbeat_thread():
    """When this fails, Prefect's heartbeat thread wakes on its stop event: flows/heartbeats.py can go."""
    source = inspect.getsource(heartbeats._prefect)
    assert "time.sleep(1)" in source and "thread.join(" in source, source
