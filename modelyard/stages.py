"""One stage: build a request from a row, parse the reply into a typed value. No I/O here.

``Stage.request(row)`` renders the prompt and returns (path, body); ``Stage.parse(reply body)``
returns the value or raises ``OutputInvalid`` keeping the raw text. Both are tested without a
model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa

from modelyard.batching import TRUNCATE
from modelyard.batching import finish_reason as embedding_finish
from modelyard.config import ModelConfig, StageConfig, stage_prompt, stage_schema
from modelyard.errors import ConfigError
from modelyard.templates import Condition, Template

INT64 = (-(2**63), 2**63 - 1)


class OutputInvalid(Exception):
    """The model's reply does not satisfy the stage's constraint."""

    def __init__(self, message: str, raw: str | None):
        super().__init__(message)
        self.raw = raw


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def arrow_type_of_schema(schema: dict[str, Any], where: str = "json_schema") -> pa.DataType:
    """The Arrow type of values valid under a JSON schema (the subset SPEC.md types)."""
    if "enum" in schema or "const" in schema:
        return _arrow_type_of_values(schema["enum"] if "enum" in schema else [schema["const"]], where)
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        if len(non_null) != 1:
            raise ConfigError(f"{where}: type {t} cannot be typed as one column type; use one type (plus null)")
        t = non_null[0]
    if t == "object":
        props = schema.get("properties")
        if not props:
            raise ConfigError(f"{where}: an object needs properties to become a struct")
        return pa.struct([pa.field(k, arrow_type_of_schema(v, f"{where}.properties.{k}")) for k, v in props.items()])
    if t == "array":
        if "items" not in schema:
            raise ConfigError(f"{where}: an array needs items")
        return pa.list_(arrow_type_of_schema(schema["items"], f"{where}.items"))
    simple = {"integer": pa.int64(), "number": pa.float64(), "string": pa.string(), "boolean": pa.bool_()}
    if t in simple:
        return simple[t]
    raise ConfigError(f"{where}: cannot type {json.dumps(schema)[:80]}: give a type of object, array, integer, "
                      "number, string, boolean (or enum)")


def _arrow_type_of_values(values: Any, where: str) -> pa.DataType:
    """The column type of an enum (or const): string for strings, else the one type of its values."""
    kinds = {type(v) for v in values if v is not None} if isinstance(values, list) else {dict}
    if kinds <= {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    raise ConfigError(f"{where}: enum {json.dumps(values)[:80]} mixes value types or holds objects; "
                      "use values of one type (strings, numbers or booleans)")


def _check_numbers(value: Any, path: str = "$") -> None:
    """JSON Schema accepts integers beyond int64 and infinities; Parquet columns do not."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"{path}: integer {value} does not fit in int64")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: number {value} is not finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, f"{path}[{i}]")


@dataclass
class Stage:
    """A stage compiled from its config: templates, constraint, output type, lineage hashes."""

    cfg: StageConfig
    model: ModelConfig
    served_name: str
    base_dir: Path
    dimensions: int | None = None  # embedding stages: the model's dimension
    template: Template = field(init=False)

    def __post_init__(self) -> None:
        c = self.cfg
        self.name = c.name
        self.source = stage_prompt(c, self.base_dir)
        self.template = Template(self.source)
        self.system = Template(c.system) if c.system else None
        self.condition = Condition(c.when) if c.when else None
        self.schema = stage_schema(c, self.base_dir)
        self.validator = None
        if self.schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(self.schema)
            except jsonschema.SchemaError as e:
                raise ConfigError(f"stages.{c.name}.json_schema: not a valid JSON schema: {e.message}") from None
            self.validator = jsonschema.Draft202012Validator(self.schema)
        self.regex = None
        if c.regex is not None:
            try:
                self.regex = re.compile(c.regex)
            except re.error as e:
                raise ConfigError(f"stages.{c.name}.regex: {e}") from None
        self.embed = self.model.task == "embed"
        self.lead_model = c.models_used[0] if c.models_used else None  # whose lineage a row starts with
        self._constraint = self.constraint_body()  # one object: the cache keys a stage's bodies by it
        self.path, self.prompt_field = ("/embeddings", "input") if self.embed else (
            ("/chat/completions", "messages") if c.api == "chat" else ("/completions", "prompt"))
        self.arrow_type = self._arrow_type()
        self.prompt_reads = self.template.variables | (self.system.variables if self.system else set())
        self.reads = self.template.variables | (self.system.variables if self.system else set()) | (
            self.condition.variables if self.condition else set())
        self.prompt_sha256 = hashlib.sha256(
            json.dumps([self.system.source if self.system else None, self.source]).encode()).hexdigest()
        self.params_sha256 = sha256_json({"params": c.params, "constraint": self.constraint_body(), "api": c.api})

    def _arrow_type(self) -> pa.DataType:
        if self.embed:
            return pa.list_(pa.float32(), self.dimensions) if self.dimensions else pa.list_(pa.float32())
        if self.cfg.choice is not None:
            return pa.dictionary(pa.int32(), pa.string())
        if self.schema is not None:
            return arrow_type_of_schema(self.schema, f"stages.{self.name}.json_schema")
        return pa.string()

    def constraint_body(self) -> dict[str, Any] | None:
        """vLLM's structured_outputs request field for the stage's constraint."""
        if self.cfg.choice is not None:
            return {"choice": self.cfg.choice}
        if self.cfg.regex is not None:
            return {"regex": self.cfg.regex}
        if self.schema is not None:
            return {"json": self.schema}
        return None

    def request(self, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The (path, body) of the request for one row; may raise RenderError. The bodies of a
        stage's rows differ only in ``prompt_field`` (``body_of``): the request cache keys them
        with the rest encoded once (``Context.cache_key``)."""
        text = self.template.render(row)
        if self.prompt_field == "messages":
            messages = [{"role": "system", "content": self.system.render(row)}] if self.system else []
            return self.path, self.body_of([*messages, {"role": "user", "content": text}])
        return self.path, self.body_of(text)

    def body_of(self, prompt: Any) -> dict[str, Any]:
        """The request body with ``prompt`` (rendered input, prompt or messages) in ``prompt_field``."""
        if self.embed:
            body = {"model": self.served_name, "input": prompt}
            if self.cfg.truncate:  # cut to the model's context rather than refused (lineage says `length`)
                body[TRUNCATE] = -1
            return body
        body: dict[str, Any] = {"model": self.served_name, **self.cfg.params, self.prompt_field: prompt}
        if self._constraint is not None:
            body["structured_outputs"] = self._constraint
        return body

    def parse(self, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(value, lineage facts) from a reply; raises OutputInvalid with the raw text."""
        usage = body.get("usage") or {}
        facts = {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}
        if self.embed:
            vec = body["data"][0]["embedding"]
            if self.dimensions and len(vec) != self.dimensions:
                raise OutputInvalid(f"embedding of {len(vec)} dimensions, expected {self.dimensions}", None)
            facts.update(finish_reason=embedding_finish(body), completion_tokens=0)
            return vec, facts
        choice = body["choices"][0]
        text = choice["message"]["content"] if self.cfg.api == "chat" else choice["text"]
        facts["finish_reason"] = choice.get("finish_reason")
        return self.validate(text, facts["finish_reason"]), facts

    def validate(self, text: str | None, finish_reason: str | None = None) -> Any:
        if text is None:
            raise OutputInvalid("the reply has no content", None)
        truncated = " (stopped at max_tokens)" if finish_reason == "length" else ""
        if self.cfg.choice is not None:
            if text not in self.cfg.choice:
                raise OutputInvalid(f"{text[:60]!r} is not one of the choices{truncated}", text)
            return text
        if self.regex is not None:
            if not self.regex.fullmatch(text):
                raise OutputInvalid(f"reply does not match the regex{truncated}", text)
            return text
        if self.validator is not None:
            try:
                value = json.loads(text)  # strict: raw control characters in strings are refused
            except json.JSONDecodeError as e:
                raise OutputInvalid(f"reply is not valid JSON: {e.msg} at {e.pos}{truncated}", text) from None
            except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep
                raise OutputInvalid(f"reply cannot be read as JSON: {e}{truncated}", text) from None
            errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
            if errors:
                e = errors[0]
                where = "/".join(str(p) for p in e.path) or "(root)"
                raise OutputInvalid(f"reply does not match the schema at {where}: {e.message[:200]}{truncated}", text)
            try:
                _check_numbers(value)
            except ValueError as e:
                raise OutputInvalid(f"reply has a value Parquet cannot hold: {e}{truncated}", text) from None
            try:  # JSON Schema calls 1e300 an integer: the column type has the last word
                pa.array([value], self.arrow_type)
            except (pa.ArrowException, OverflowError) as e:
                raise OutputInvalid(f"reply has a value its column cannot hold: {e}{truncated}", text) from None
            return value
        return text
