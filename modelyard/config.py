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
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM server option, e.g. {enable_prefix_caching: true} -> --enable-prefix-caching.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for this model's server.")
    startup_timeout: float = Field(900, gt=0, description="Seconds to wait for the server to become healthy.")
    max_restarts: int = Field(2, ge=0, description="Restarts of a server that dies during a run before the run fails.")
    replicas: int = Field(1, ge=1, description="Managed servers of this model; requests go to the least busy.")


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


class StageConfig(Strict):
    name: str = Field(pattern=IDENT, description="Stage name: task-run names, lineage field.")
    model: str = Field(description="Key of the model under `models`.")
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
    def _one_prompt_one_constraint(self) -> StageConfig:
        sources = [k for k in ("prompt", "prompt_file", "input") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of prompt, prompt_file (generation) or input (embedding)")
        constraints = [k for k in ("choice", "json_schema", "json_schema_file", "regex") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(f"give at most one structured-output constraint, not {', '.join(constraints)}")
        return self

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
        for i, st in enumerate(self.stages):
            if st.name in seen:
                problems.append(f"stages[{i}].name: {st.name!r} is also stages[{seen[st.name]}]")
            seen.setdefault(st.name, i)
            if st.output in outputs:
                problems.append(f"stages[{i}].output: column {st.output!r} is also written by stages[{outputs[st.output]}]")
            outputs.setdefault(st.output, i)
            if st.output.startswith("_"):
                problems.append(f"stages[{i}].output: names starting with _ are reserved for lineage columns")
            m = self.models.get(st.model)
            if m is None:
                problems.append(f"stages[{i}].model: {st.model!r} is not one of models: {', '.join(self.models)}")
                continue
            if m.task == "embed":
                if st.input is None:
                    problems.append(f"stages[{i}]: model {st.model!r} embeds; give `input`, not a prompt")
                if st.constraint:
                    problems.append(f"stages[{i}]: an embedding stage takes no {st.constraint}")
            elif st.input is not None:
                problems.append(f"stages[{i}].input: model {st.model!r} generates; use `prompt` (or task: embed)")
            if st.system is not None and st.api != "chat":
                problems.append(f"stages[{i}].system: a system message needs api: chat")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
