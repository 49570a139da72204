"""modelyard's flow runs end when their work ends; their heartbeats are kept.

Prefect 3.9 sends a flow run's heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 180 s by default:
what a zombie-run automation watches) from a thread that sleeps in one-second steps, and its sync
engine joins that thread as the run ends (``prefect.flow_engine._send_heartbeats``). So every flow
run returns on a whole second after it began, 0-1 s after its work: once for the pipeline's flow
run and once more for its shards subflow, the largest fixed cost of a run that modelyard measured
(benchmarks/README.md).

For modelyard's two flows the engine stops that thread without waiting for it, as Prefect's own
async engine does (``join_on_exit=False``): the thread sees the stop within a second and sends no
heartbeat after it (it checks before each). Other flows of the process keep Prefect's behaviour.
tests/test_heartbeats.py fails once Prefect stops sleeping in that thread, so that this can go.
"""

from __future__ import annotations

from prefect import flow_engine

FLOWS = frozenset({"modelyard-pipeline", "modelyard-shards"})

_prefect = flow_engine._send_heartbeats


def _send_heartbeats(engine, join_on_exit: bool = True):
    ours = getattr(getattr(engine, "flow", None), "name", None) in FLOWS
    return _prefect(engine, join_on_exit=join_on_exit and not ours)


def install() -> None:
    """Route Prefect's heartbeat context through ``_send_heartbeats`` (once; safe to repeat)."""
    flow_engine._send_heartbeats = _send_heartbeats
