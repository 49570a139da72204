"""What a shard task needs to run: the models it may reach and the job it belongs to.

``Job`` travels by value to whichever worker runs a shard (threads, Ray, Dask); it compiles its
stages there, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from modelyard.cache import RequestCache, open_cache
from modelyard.client import Dispatcher, Pool
from modelyard.config import PipelineConfig
from modelyard.lineage import output_schema
from modelyard.stages import Stage
from modelyard.staging import Staging


@dataclass
class ModelRuntime:
    """What a worker needs to reach one model: picklable, no secrets (keys stay in the env)."""

    name: str
    model_id: str
    served_name: str
    endpoints: list[str]
    revision: str
    engine_version: str
    dimensions: int | None = None


class CacheMiss(Exception):
    """A request of a cache-only pass that the cache cannot answer."""


@dataclass
class Job:
    """Everything a shard task needs, passed by value to whichever worker runs it."""

    config: PipelineConfig
    base_dir: str
    job_key: str
    output_root: str
    run_id: str
    models: dict[str, ModelRuntime]
    cache_path: str | None = None
    cache_nondeterministic: bool = False
    retry_truncated: bool = False
    retry_errors: bool = False  # ask again what the cache remembers as refused
    wave: int = 0  # which GPU wave this pass runs (see modelyard.planner); most runs have one
    waves: int = 1
    wave_stages: tuple[int, ...] | None = None  # the stages of this wave; None: every stage
    cache_only: bool = False  # no server is up: a shard the cache cannot answer whole is left for later
    thresholds: dict[str, list[float | None]] = field(default_factory=dict)  # calibrated, by cascade stage
    workers: int = 1  # processes that run shards at once (Ray, Dask): they split each endpoint's bound
    wave_tiers: dict[int, tuple[int, int]] | None = None  # cascade stage -> the tiers of this wave, if split
    _stages: list[Stage] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Compiled stages stay behind when a job travels to a worker; it compiles its own."""
        return {**self.__dict__, "_stages": None}

    def staging(self) -> Staging:
        return Staging.for_job(self.output_root, self.job_key)

    def stages(self) -> list[Stage]:
        """Every stage of the config, compiled with its strategy. A stage of a later wave, whose
        models are not up yet, compiles with the configured names: it is described (lineage) but
        sends nothing."""
        if self._stages is None:
            from modelyard.strategies import strategy_for

            # built aside and published whole: the shards of one run share this job across threads,
            # and a shard must never see a list still being filled (it did: IndexError, then a retry)
            stages = []
            for s in self.config.stages:
                first = s.models_used[0]
                rt = self.models.get(first)
                st = Stage(s, self.config.models[first], rt.served_name if rt else first, Path(self.base_dir),
                           rt.dimensions if rt else None)
                span = (self.wave_tiers or {}).get(len(stages))
                st.strategy = strategy_for(st, self.config, Path(self.base_dir), self.thresholds.get(s.name), span)
                st.reads = st.reads | st.strategy.reads
                stages.append(st)
            self._stages = stages
        return self._stages

    def active(self) -> list[Stage]:
        """The stages this pass runs: all, or those of its wave."""
        st = self.stages()
        return st if self.wave_stages is None else [st[i] for i in self.wave_stages]

    @property
    def last_wave(self) -> bool:
        return self.wave == self.waves - 1

    def cache(self) -> RequestCache | None:
        return open_cache(self.cache_path) if self.cache_path else None

    def pools(self) -> dict[str, Pool]:
        """A bounded pool per model the active stages may ask (every replica of it). With shards in
        ``workers`` processes at once, each process gets its share of every endpoint's bound, so
        that a server never sees more than ``max_in_flight`` from all of them together."""
        d = Dispatcher.get()
        out = {}
        for name in dict.fromkeys(m for st in self.active() for m in st.strategy.models):
            rt = self.models[name]
            m = self.config.models[name]
            limit = max(1, m.in_flight // max(1, self.workers))
            out[name] = d.pool(name, rt.endpoints, limit, m.api_key_env, m.timeout, m.retries)
        return out

    def schema(self, input_schema: pa.Schema) -> pa.Schema:
        st = self.stages()
        return output_schema(input_schema, [(s.cfg.output, s.arrow_type) for s in st],
                             {s.name: s.strategy.lineage_type for s in st})
