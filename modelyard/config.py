"""The pipeline YAML as pydantic models: every field described, unknown keys refused.

``load_config(path, params)`` reads the file, checks its schema and fills ``{param}``
placeholders in the input and output locations. Deeper checks that need the input's columns or
the stages' templates live in ``modelyard.validate``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelyard.errors import ConfigError

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputConfig(Strict):
    uri: str = Field(description="File, folder, glob or fsspec URI of the input; {param} placeholders allowed.")
    format: Literal["auto", "parquet", "jsonl", "csv", "hf"] = Field(
        "auto", description="Input format; auto picks it from the file extension or folder layout."
    )
    key: str | None = Field(
        None, description="Column holding a unique row key; omitted: derived from source file and row position."
    )


class ServeOptions(Strict):
    """How modelyard starts a managed vLLM server for a model."""

    max_model_len: int | None = Field(None, gt=0, description="vLLM --max-model-len.")
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM --max-num-seqs; requests in flight default to 1.5 times it.")
    dtype: str | None = Field(None, description="vLLM --dtype.")
    tensor_parallel_size: int | None = Field(None, gt=0, description="vLLM --tensor-parallel-size.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM --gpu-memory-utilization (on vLLM's CPU backend: the share of the "
        "NUMA node's memory). Set: it wins over the planner's share. Omitted: the planner gives the server a "
        "share that fits beside the others.")
    memory_gb: float | None = Field(
        None, gt=0, description="What the server needs in GiB (weights + KV cache + runtime), per replica; "
        "omitted: estimated from the weight files and the KV cache budget.")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache budget in GiB per replica; omitted: max_num_seqs x max_model_len "
        "tokens of the model's config.json (layers, KV heads, head size, dtype), at most 4 GiB.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM server option, e.g. {enable_prefix_caching: true} -> --enable-prefix-caching.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for this model's server.")
    startup_timeout: float = Field(900, gt=0, description="Seconds to wait for the server to become healthy.")
    max_restarts: int = Field(2, ge=0, description="Restarts of a server that dies during a run before the run fails.")
    replicas: int = Field(1, ge=1, description="Managed servers of this model; requests go to the least busy.")


class PriceConfig(Strict):
    """What a model costs: per token (an API or a rented endpoint) or per GPU-hour (a managed server)."""

    prompt_per_1m: float | None = Field(None, ge=0, description="Price of 1,000,000 prompt tokens.")
    completion_per_1m: float | None = Field(None, ge=0, description="Price of 1,000,000 completion tokens.")
    gpu_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour of a managed server; its "
                                   "GPU-seconds over the run are split across its rows by tokens.")

    @model_validator(mode="after")
    def _one_kind(self) -> PriceConfig:
        per_token = self.prompt_per_1m is not None or self.completion_per_1m is not None
        if per_token and self.gpu_hour is not None:
            raise ValueError("give a price per token (prompt_per_1m, completion_per_1m) or gpu_hour, not both")
        if not per_token and self.gpu_hour is None:
            raise ValueError("give prompt_per_1m and completion_per_1m, or gpu_hour")
        return self


class ModelConfig(Strict):
    model: str = Field(description="HF id, local path, or builtin:NAME (builtin:tiny-llama, builtin:minilm).")
    endpoints: list[str] | None = Field(
        None, description="External: base URLs of already running vLLM replicas (…/v1). Omitted: managed."
    )
    serve: ServeOptions | None = Field(None, description="Managed: options of the vLLM server modelyard starts.")
    task: Literal["generate", "embed"] = Field("generate", description="generate (chat/completions) or embed.")
    revision: str | None = Field(None, description="Model revision to record in lineage (and to serve, if managed).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key; never logged.")
    max_in_flight: int | None = Field(
        None, gt=0, description="Requests in flight per endpoint; default 1.5 x serve.max_num_seqs, else 96."
    )
    timeout: float = Field(300, gt=0, description="Seconds to wait for one response.")
    retries: int = Field(3, ge=0, description="Retries of a transient failure (connection, 5xx, 429) per request.")
    price: PriceConfig | None = Field(None, description="What the model costs, for the cost figures of a run.")

    @model_validator(mode="after")
    def _managed_or_external(self) -> ModelConfig:
        if self.endpoints is not None and self.serve is not None:
            raise ValueError("give either endpoints (external servers) or serve (managed), not both")
        if self.endpoints is not None and not self.endpoints:
            raise ValueError("endpoints is empty")
        for url in self.endpoints or []:
            if not re.match(r"^https?://", url):
                raise ValueError(f"endpoint {url!r} is not an http(s) URL")
        return self

    @property
    def managed(self) -> bool:
        return self.endpoints is None

    @property
    def in_flight(self) -> int:
        """Requests in flight per endpoint: ``max_in_flight``, else 1.5 x ``serve.max_num_seqs``,
        else 96 (1.5 x 64). Half a batch more than the engine runs waits in its queue, so a slot
        freed by a finished request is filled at the engine's next step rather than after an HTTP
        round trip (benchmarks/throughput.py: a bare client at 96 beat 64 by 3-5 % with
        max_num_seqs 64; vLLM's own offline pooling keeps 2 x max_num_seqs in its engine)."""
        if self.max_in_flight:
            return self.max_in_flight
        seqs = self.serve.max_num_seqs if self.serve and self.serve.max_num_seqs else 64
        return seqs + seqs // 2


class TierConfig(Strict):
    """One tier of a cascade: a model, and how sure it must be for a row to stop here."""

    model: str = Field(description="Key of the model under `models`.")
    min_confidence: float | Literal["auto"] | None = Field(
        None, description="Rows whose answer has a lower confidence (from logprobs) go on to the next tier; "
        "auto: set by `calibrate`. Omitted: only invalid, failed, truncated, escalate_when or judged rows go on.")


class JudgeConfig(Strict):
    """A model that rates a tier's answer; rows it rejects go on to the next tier."""

    model: str = Field(description="Key of the model under `models`.")
    prompt: str | None = Field(None, description="Jinja2 template; reads the row and the stage's output.")
    prompt_file: str | None = Field(None, description="File holding the judge's prompt, relative to the config.")
    system: str | None = Field(None, description="Jinja2 template of a system message.")
    choice: list[str] | None = Field(None, description="Structured output of the judge: one of these strings.")
    regex: str | None = Field(None, description="Structured output of the judge: text matching this regex.")
    json_schema: dict[str, Any] | None = Field(None, description="Structured output of the judge: JSON.")
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling params of the judge.")
    output: str = Field(pattern=IDENT, description="Name of the judge's answer, as accept_when reads it.")
    accept_when: str = Field(description="Expression over the judge's output (and the row): true keeps the "
                             "tier's answer, false sends the row on.")

    @model_validator(mode="after")
    def _one_prompt(self) -> JudgeConfig:
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError("give exactly one of prompt or prompt_file")
        constraints = [k for k in ("choice", "regex", "json_schema") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(f"give at most one structured-output constraint, not {', '.join(constraints)}")
        return self


class CalibrateConfig(Strict):
    """How `min_confidence: auto` thresholds are set."""

    rows: int = Field(200, gt=0, description="Sample rows every tier answers (drawn with a fixed seed).")
    agreement: float = Field(0.95, gt=0, le=1, description="Least share of the sample on which the cascade "
                             "must answer as its last tier does.")
    seed: int = Field(0, description="Seed of the sample.")


class VoteConfig(Strict):
    """Several models, or several samples of one, answer; the majority wins."""

    models: list[str] | None = Field(None, description="Keys of the voting models, in tie-break order.")
    model: str | None = Field(None, description="One model asked `samples` times.")
    samples: int | None = Field(None, ge=2, description="Samples per model (temperature above 0).")

    @model_validator(mode="after")
    def _who(self) -> VoteConfig:
        if (self.models is None) == (self.model is None):
            raise ValueError("give models: [a, b, ...] or model: a with samples: N")
        if self.models is not None and len(set(self.models)) != len(self.models):
            raise ValueError("models names a model twice; use samples to ask one model several times")
        return self

    @property
    def voters(self) -> list[str]:
        return list(self.models) if self.models is not None else [str(self.model)]


class RouteRule(Strict):
    """One rule of a route: rows for which `when` holds go to `model`."""

    when: str | None = Field(None, description="Jinja2 expression over the row; omitted on the last rule.")
    model: str = Field(description="Key of the model under `models`.")


class StageConfig(Strict):
    name: str = Field(pattern=IDENT, description="Stage name: task-run names, lineage field.")
    model: str | None = Field(None, description="Key of the model under `models` (or give cascade, vote or route).")
    cascade: list[TierConfig] | None = Field(
        None, description="Tiers in order: a row stops at the first tier whose answer it trusts.")
    escalate_when: str | None = Field(None, description="Cascade: also go on when this holds for a tier's answer.")
    judge: JudgeConfig | None = Field(None, description="Cascade: a model rates each tier's answer.")
    calibrate: CalibrateConfig | None = Field(None, description="Cascade: how `min_confidence: auto` is set.")
    vote: VoteConfig | None = Field(None, description="Several models (or samples) answer; the majority wins.")
    route: list[RouteRule] | None = Field(None, description="Per row, the first rule whose `when` holds names "
                                          "the model.")
    prompt: str | None = Field(None, description="Jinja2 template (sandboxed) of the user message.")
    prompt_file: str | None = Field(None, description="File holding the prompt template, relative to the config.")
    system: str | None = Field(None, description="Jinja2 template of a system message (chat only).")
    input: str | None = Field(None, description="Jinja2 template of the text to embed (embedding stages).")
    api: Literal["chat", "completion"] = Field("chat", description="/v1/chat/completions or /v1/completions.")
    choice: list[str] | None = Field(None, description="Structured output: one of these strings.")
    json_schema: dict[str, Any] | None = Field(None, description="Structured output: JSON matching this schema.")
    json_schema_file: str | None = Field(None, description="File holding the JSON schema, relative to the config.")
    regex: str | None = Field(None, description="Structured output: text matching this regular expression.")
    params: dict[str, Any] = Field(default_factory=dict, description="vLLM sampling params (temperature, max_tokens…).")
    when: str | None = Field(None, description="Jinja2 expression; rows where it is false are skipped, not dropped.")
    output: str = Field(pattern=IDENT, description="Name of the output column.")
    batch_size: int = Field(32, ge=1, le=4096, description="Embedding stages: inputs per /v1/embeddings request "
                            "(rows keep their own lineage; a refused batch is split so only the bad row fails).")
    truncate: bool = Field(False, description="Embedding stages: a text longer than the model's context is cut "
                           "to it (vLLM's truncate_prompt_tokens) instead of becoming an error row; its lineage "
                           "says finish_reason: length.")

    @field_validator("choice")
    @classmethod
    def _choice(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("choice list is empty")
            if len(set(v)) != len(v):
                raise ValueError("choice list has duplicates")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "messages", "prompt", "input", "stream", "n", "structured_outputs", "response_format"}
        bad = sorted(reserved & set(v))
        if bad:
            raise ValueError(f"params may not set {', '.join(bad)}: modelyard sets them from the stage")
        return v

    @model_validator(mode="after")
    def _one_strategy(self) -> StageConfig:
        given = [k for k in ("model", "cascade", "vote", "route") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model, cascade, vote or route"
                             + (f", not {' and '.join(given)}" if given else ""))
        if self.vote is not None:
            if self.constraint is None:
                raise ValueError("vote: free text cannot be voted on; give choice, regex or json_schema")
            if len(self.vote.voters) * (self.vote.samples or 1) < 2:
                raise ValueError("vote: a vote of one model needs samples: N (N >= 2)")
            if self.vote.samples and not float(self.params.get("temperature", 1.0) or 0) > 0:
                raise ValueError("vote.samples: samples of one model differ only when sampled: set "
                                 "params.temperature above 0")
        if self.route is not None:
            if not self.route:
                raise ValueError("route: give at least one rule")
            for j, r in enumerate(self.route[:-1]):
                if r.when is None:
                    raise ValueError(f"route[{j}].when: every rule but the last needs `when` (rules after "
                                     "it could never be reached)")
            if self.route[-1].when is not None:
                raise ValueError(f"route[{len(self.route) - 1}].when: the last rule takes every row left and "
                                 "has no `when`")
        if self.cascade is None:
            extra = [k for k in ("escalate_when", "judge", "calibrate") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} belong(s) to a cascade; this stage has none")
            return self
        tiers = self.cascade
        if len(tiers) < 2:
            raise ValueError("cascade: a cascade needs at least two tiers (one tier is `model:`)")
        for i, t in enumerate(tiers):
            if isinstance(t.min_confidence, float) and not 0 <= t.min_confidence <= 1:
                raise ValueError(f"cascade[{i}].min_confidence: {t.min_confidence} is outside 0..1")
        if tiers[-1].min_confidence is not None:
            raise ValueError(f"cascade[{len(tiers) - 1}].min_confidence: the last tier answers every row that "
                             "reaches it; a threshold there means nothing")
        auto = any(t.min_confidence == "auto" for t in tiers)
        if self.calibrate is not None and not auto:
            raise ValueError("calibrate: no tier has min_confidence: auto, so there is nothing to calibrate")
        if auto and self.calibrate is None:
            self.calibrate = CalibrateConfig()
        return self

    @model_validator(mode="after")
    def _one_prompt_one_constraint(self) -> StageConfig:
        sources = [k for k in ("prompt", "prompt_file", "input") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of prompt, prompt_file (generation) or input (embedding)")
        constraints = [k for k in ("choice", "json_schema", "json_schema_file", "regex") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(f"give at most one structured-output constraint, not {', '.join(constraints)}")
        return self

    @property
    def strategy(self) -> str:
        """single (one model), cascade, vote or route."""
        for k in ("cascade", "vote", "route"):
            if getattr(self, k) is not None:
                return k
        return "single"

    @property
    def models_used(self) -> list[str]:
        """Every model the stage may ask, in order: the model, the tiers (then the judge), the
        voters, or the routes' models."""
        if self.cascade is not None:
            names = [t.model for t in self.cascade] + ([self.judge.model] if self.judge else [])
        elif self.vote is not None:
            names = self.vote.voters
        elif self.route is not None:
            names = [r.model for r in self.route]
        else:
            names = [self.model] if self.model else []
        return list(dict.fromkeys(names))

    @property
    def constraint(self) -> str | None:
        for k in ("choice", "json_schema", "json_schema_file", "regex"):
            if getattr(self, k) is not None:
                return "json_schema" if k == "json_schema_file" else k
        return None


class OutputConfig(Strict):
    uri: str = Field(description="Folder or fsspec URI of the output dataset; {param} placeholders allowed.")
    partition: str | None = Field(None, description="Partition folder, e.g. dt={date}: atomically replaced per run.")
    target_file_mb: float = Field(256, gt=0, description="Target size of each merged Parquet part, in MB.")
    compression: str = Field("zstd", description="Parquet compression codec.")


class OpenLineageConfig(Strict):
    transport: Literal["file", "http", "none"] = Field("file", description="file (beside the output), http, none.")
    url: str | None = Field(None, description="OpenLineage endpoint for the http transport.")
    namespace: str = Field("modelyard", description="OpenLineage job namespace.")

    @model_validator(mode="after")
    def _url(self) -> OpenLineageConfig:
        if self.transport == "http" and not self.url:
            raise ValueError("the http transport needs url")
        return self


class LineageConfig(Strict):
    openlineage: OpenLineageConfig = Field(default_factory=OpenLineageConfig)


class CacheConfig(Strict):
    enabled: bool = Field(True, description="Serve repeated requests from the request cache.")
    path: str | None = Field(
        None, description="SQLite file of the cache; default $MODELYARD_CACHE, else beside the output "
        "(<output parent>/_modelyard/<output name>/cache.sqlite). Share one path to share across configs.")
    nondeterministic: bool = Field(
        False, description="Also cache sampled requests (temperature > 0 without a seed).")


class RunnerConfig(Strict):
    kind: Literal["local", "ray", "dask"] = Field(
        "local", description="local: threads of this process; ray: prefect-ray's RayTaskRunner; dask: prefect-dask.")
    address: str | None = Field(
        None, description="ray: cluster address (e.g. ray://head:10001); dask: scheduler address. "
        "Omitted: a local cluster is started for the run.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray cluster started for the run.")


class EngineConfig(Strict):
    python: str | None = Field(
        None, description="Python of the engine environment; default $MODELYARD_ENGINE_PYTHON or .venv-engine."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every managed server.")


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Job name.")
    input: InputConfig
    shard_rows: int = Field(2000, gt=0, description="Rows per shard.")
    parallel_shards: int = Field(4, gt=0, description="Shards processed at once in this process.")
    models: dict[str, ModelConfig] = Field(description="Models by name; stages refer to these names.")
    stages: list[StageConfig] = Field(min_length=1, description="Stages, run in order on every row.")
    output: OutputConfig
    lineage: LineageConfig = Field(default_factory=LineageConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="after")
    def _references(self) -> PipelineConfig:
        problems = []
        seen: dict[str, int] = {}
        outputs: dict[str, int] = {}
        for name, m in self.models.items():
            if m.price is not None and m.price.gpu_hour is not None and not m.managed:
                problems.append(f"models.{name}.price.gpu_hour: only a managed server's GPU time is known; "
                                "price an external endpoint per token (prompt_per_1m, completion_per_1m)")
        for i, st in enumerate(self.stages):
            if st.name in seen:
                problems.append(f"stages[{i}].name: {st.name!r} is also stages[{seen[st.name]}]")
            seen.setdefault(st.name, i)
            if st.output in outputs:
                problems.append(f"stages[{i}].output: column {st.output!r} is also written by stages[{outputs[st.output]}]")
            outputs.setdefault(st.output, i)
            if st.output.startswith("_"):
                problems.append(f"stages[{i}].output: names starting with _ are reserved for lineage columns")
            problems += self._stage_models(i, st)
            if st.system is not None and st.api != "chat":
                problems.append(f"stages[{i}].system: a system message needs api: chat")
        if problems:
            raise ValueError("; ".join(problems))
        return self


    def _stage_models(self, i: int, st: StageConfig) -> list[str]:
        """The models a stage names exist, and fit what the stage asks of them."""
        problems = []
        refs: list[tuple[str, str]] = []  # (key path, model name)
        if st.model is not None:
            refs.append(("model", st.model))
        for j, t in enumerate(st.cascade or []):
            refs.append((f"cascade[{j}].model", t.model))
        if st.judge is not None:
            refs.append(("judge.model", st.judge.model))
        if st.vote is not None:
            refs += [(f"vote.models[{j}]", m) for j, m in enumerate(st.vote.models or [])]
            refs += [("vote.model", st.vote.model)] if st.vote.model else []
        for j, r in enumerate(st.route or []):
            refs.append((f"route[{j}].model", r.model))
        for key, name in refs:
            m = self.models.get(name)
            if m is None:
                problems.append(f"stages[{i}].{key}: {name!r} is not one of models: {', '.join(self.models)}")
                continue
            if st.model is None and m.task == "embed":
                what = key.split("[")[0].split(".")[0]
                problems.append(f"stages[{i}].{key}: {name!r} is an embedding model; a {what} needs models that "
                                "generate")
                continue
            if key == "judge.model":
                continue
            if m.task != "embed":
                given = sorted({"batch_size", "truncate"} & st.model_fields_set)
                if given:
                    problems.append(f"stages[{i}].{given[0]}: only an embedding stage takes {given[0]}; model "
                                    f"{name!r} generates")
            if m.task == "embed":
                if st.input is None:
                    problems.append(f"stages[{i}]: model {name!r} embeds; give `input`, not a prompt")
                if st.constraint:
                    problems.append(f"stages[{i}]: an embedding stage takes no {st.constraint}")
            elif st.input is not None:
                problems.append(f"stages[{i}].input: model {name!r} generates; use `prompt` (or task: embed)")
        return problems


class LoadedConfig(BaseModel):
    """A config as loaded: the model, its source text and path, and the resolved params."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    config: PipelineConfig
    path: str
    text: str
    params: dict[str, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent


def placeholders(text: str) -> list[str]:
    return PLACEHOLDER.findall(text)


def fill(text: str, params: dict[str, str], where: str) -> str:
    missing = [p for p in placeholders(text) if p not in params]
    if missing:
        raise ConfigError(
            f"{where} {text!r} needs parameter {', '.join(repr(m) for m in missing)}: "
            f"pass --param {missing[0]}=VALUE"
        )
    return PLACEHOLDER.sub(lambda m: str(params[m.group(1)]), text)


def format_pydantic(err: ValidationError, path: str) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(f"{path}: {loc or '(top)'}: {msg}")
    return out


def parse_config(text: str, path: str) -> PipelineConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, input, models, stages, output)")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = format_pydantic(e, path)
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the config", problems) from None


def load_config(path: str | Path, params: dict[str, str] | None = None, *, resolve: bool = True) -> LoadedConfig:
    """Read and check a pipeline YAML; with ``resolve`` fill the {param} placeholders."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = p.read_text()
    cfg = parse_config(text, str(path))
    params = dict(params or {})
    if resolve:
        cfg.input.uri = fill(cfg.input.uri, params, f"{path}: input.uri")
        cfg.output.uri = fill(cfg.output.uri, params, f"{path}: output.uri")
        if cfg.output.partition:
            cfg.output.partition = fill(cfg.output.partition, params, f"{path}: output.partition")
    return LoadedConfig(config=cfg, path=str(path), text=text, params=params)


def stage_schema(stage: StageConfig, base_dir: Path) -> dict[str, Any] | None:
    """The stage's JSON schema, inline or read from json_schema_file."""
    if stage.json_schema is not None:
        return stage.json_schema
    if stage.json_schema_file is None:
        return None
    f = base_dir / stage.json_schema_file
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise ConfigError(f"stages.{stage.name}.json_schema_file: {f} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"stages.{stage.name}.json_schema_file: {f} is not JSON: {e}") from None


def stage_prompt(stage: StageConfig, base_dir: Path) -> str:
    """The stage's template source: prompt, prompt_file's text, or the embedding input."""
    if stage.prompt is not None:
        return stage.prompt
    if stage.input is not None:
        return stage.input
    f = base_dir / str(stage.prompt_file)
    try:
        return f.read_text()
    except FileNotFoundError:
        raise ConfigError(f"stages.{stage.name}.prompt_file: {f} not found") from None


def parse_params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not re.match(IDENT, k):
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE with KEY a name")
        out[k] = v
    return out
