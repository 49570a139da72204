"""modelyard's Prefect flows: ``flows.pipeline`` (a run) and ``flows.shards`` (its fan-out)."""

from flows import heartbeats

heartbeats.install()  # a flow run of this package returns when its work is done, not on the next whole second
