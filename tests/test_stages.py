"""Stages compiled from the config: request bodies, reply parsing and validation, output types and
lineage hashes. Replies are written by hand: no model server."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from modelyard.config import parse_config
from modelyard.errors import ConfigError
from modelyard.stages import OutputInvalid, Stage, arrow_type_of_schema
from modelyard.templates import RenderError

HEAD = """
name: t
input: {uri: in.jsonl}
models:
  gen: {model: some/model, endpoints: ["http://127.0.0.1:9/v1"]}
  emb: {model: builtin:minilm, task: embed}
output: {uri: out}
stages:
"""


def stage(tmp_path: Path, body: str, served: str = "served-name", dimensions: int | None = None) -> Stage:
    """The single stage of a config whose `stages:` list is ``body`` (YAML of one stage)."""
    text = HEAD + textwrap.indent(textwrap.dedent(body).strip(), "  ")
    cfg = parse_config(text, "t.yaml")
    sc = cfg.stages[0]
    return Stage(sc, cfg.models[sc.model], served, tmp_path, dimensions)


def chat_reply(content, finish_reason: str = "stop") -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}


ROW = {"text": "the printer is on fire", "lang": "en", "n": 3}


# --- requests --------------------------------------------------------------------------------


def test_chat_request_with_params_and_system(tmp_path):
    st = stage(tmp_path, """
        - name: summarize
          model: gen
          system: "Answer in {{ lang }}."
          prompt: "Summarize: {{ text }}"
          params: {temperature: 0.2, max_tokens: 64, seed: 1}
          output: summary
    """)
    path, body = st.request(ROW)
    assert path == "/chat/completions"
    assert body == {
        "model": "served-name", "temperature": 0.2, "max_tokens": 64, "seed": 1,
        "messages": [{"role": "system", "content": "Answer in en."},
                     {"role": "user", "content": "Summarize: the printer is on fire"}],
    }
    assert st.reads == {"text", "lang"}
    assert st.arrow_type == pa.string()


def test_completion_request(tmp_path):
    st = stage(tmp_path, """
        - name: go
          model: gen
          api: completion
          prompt: "Q: {{ text }}\\nA:"
          params: {max_tokens: 5}
          output: answer
    """)
    path, body = st.request(ROW)
    assert path == "/completions"
    assert body == {"model": "served-name", "max_tokens": 5, "prompt": "Q: the printer is on fire\nA:"}
    value, facts = st.parse({"choices": [{"text": " yes", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 7, "completion_tokens": 1}})
    assert value == " yes"
    assert facts == {"prompt_tokens": 7, "completion_tokens": 1, "finish_reason": "stop"}


def test_embedding_request_and_reply(tmp_path):
    st = stage(tmp_path, """
        - name: embed
          model: emb
          input: "{{ text }}"
          output: vec
    """, dimensions=3)
    path, body = st.request(ROW)
    assert (path, body) == ("/embeddings", {"model": "served-name", "input": "the printer is on fire"})
    assert "structured_outputs" not in body
    assert st.arrow_type == pa.list_(pa.float32(), 3)
    value, facts = st.parse({"data": [{"embedding": [0.1, 0.2, 0.3]}], "usage": {"prompt_tokens": 6}})
    assert value == [0.1, 0.2, 0.3]
    assert facts["prompt_tokens"] == 6 and facts["completion_tokens"] == 0 and facts["finish_reason"] == "stop"
    with pytest.raises(OutputInvalid, match="2 dimensions, expected 3"):
        st.parse({"data": [{"embedding": [0.1, 0.2]}]})
    unknown = stage(tmp_path, """
        - name: embed
          model: emb
          input: "{{ text }}"
          output: vec
    """)
    assert unknown.arrow_type == pa.list_(pa.float32())


@pytest.mark.parametrize("constraint, expected", [
    ("choice: [billing, bug, other]", {"choice": ["billing", "bug", "other"]}),
    ("regex: '[A-Z]{3}-[0-9]+'", {"regex": "[A-Z]{3}-[0-9]+"}),
    ("json_schema: {type: object, properties: {n: {type: integer}}, required: [n]}",
     {"json": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}),
])
def test_constraints_become_structured_outputs(tmp_path, constraint, expected):
    st = stage(tmp_path, f"""
        - name: s
          model: gen
          prompt: "{{{{ text }}}}"
          {constraint}
          output: o
    """)
    _, body = st.request(ROW)
    assert body["structured_outputs"] == expected
    assert "response_format" not in body and "guided_choice" not in body
    _, body = stage(tmp_path, """
        - name: s
          model: gen
          api: completion
          prompt: "{{ text }}"
          choice: [a, b]
          output: o
    """).request(ROW)
    assert body["structured_outputs"] == {"choice": ["a", "b"]} and body["prompt"] == ROW["text"]


def test_json_schema_file_is_read_relative_to_the_base_dir(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "s.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}}))
    st = stage(tmp_path, """
        - name: s
          model: gen
          prompt: "{{ text }}"
          json_schema_file: schemas/s.json
          output: o
    """)
    assert st.request(ROW)[1]["structured_outputs"] == {"json": {"type": "object", "properties": {"a": {"type": "boolean"}}}}
    assert st.arrow_type == pa.struct([("a", pa.bool_())])
    with pytest.raises(ConfigError, match="nope.json not found"):
        stage(tmp_path, """
            - name: s
              model: gen
              prompt: "{{ text }}"
              json_schema_file: schemas/nope.json
              output: o
        """)


def test_prompt_file_and_missing_column(tmp_path):
    (tmp_path / "p.j2").write_text("Ticket {{ row['text'] }} ({{ n }})")
    st = stage(tmp_path, """
        - name: s
          model: gen
          prompt_file: p.j2
          output: o
    """)
    assert st.request(ROW)[1]["messages"] == [{"role": "user", "content": "Ticket the printer is on fire (3)"}]
    with pytest.raises(RenderError, match="'n' is undefined"):
        st.request({"text": "x"})


# --- parsing and validation ------------------------------------------------------------------


@pytest.fixture
def choice(tmp_path) -> Stage:
    return stage(tmp_path, """
        - name: classify
          model: gen
          prompt: "{{ text }}"
          choice: [billing, bug, feature]
          output: label
    """)


def test_choice_valid_and_invalid(choice):
    value, facts = choice.parse(chat_reply("bug"))
    assert value == "bug"
    assert facts == {"prompt_tokens": 11, "completion_tokens": 3, "finish_reason": "stop"}
    with pytest.raises(OutputInvalid, match="not one of the choices") as e:
        choice.parse(chat_reply("Bug"))
    assert e.value.raw == "Bug"
    with pytest.raises(OutputInvalid) as e:
        choice.parse(chat_reply("bu", finish_reason="length"))
    assert e.value.raw == "bu" and "max_tokens" in str(e.value)
    with pytest.raises(OutputInvalid, match="no content") as e:
        choice.parse(chat_reply(None))
    assert e.value.raw is None
    assert choice.arrow_type == pa.dictionary(pa.int32(), pa.string())


def test_regex_is_a_full_match(tmp_path):
    st = stage(tmp_path, """
        - name: code
          model: gen
          prompt: "{{ text }}"
          regex: "[A-Z]{3}-[0-9]+"
          output: code
    """)
    assert st.validate("ABC-123") == "ABC-123"
    for text in ("ABC-123 and more", "xABC-123", "ABC-"):
        with pytest.raises(OutputInvalid, match="does not match the regex") as e:
            st.validate(text)
        assert e.value.raw == text
    with pytest.raises(OutputInvalid, match="max_tokens"):
        st.validate("ABC-", "length")
    assert st.arrow_type == pa.string()
    with pytest.raises(ConfigError, match="stages.code.regex"):
        stage(tmp_path, """
            - name: code
              model: gen
              prompt: "{{ text }}"
              regex: "[A-Z"
              output: code
        """)


SCHEMA_STAGE = """
- name: extract
  model: gen
  prompt: "{{ text }}"
  json_schema:
    type: object
    properties:
      product: {type: string}
      count: {type: integer}
      tags: {type: array, items: {type: string}}
    required: [product, count]
  output: info
"""


def test_json_valid(tmp_path):
    st = stage(tmp_path, SCHEMA_STAGE)
    value, facts = st.parse(chat_reply('{"product": "printer", "count": 2, "tags": ["fire"]}'))
    assert value == {"product": "printer", "count": 2, "tags": ["fire"]}
    assert facts["finish_reason"] == "stop"
    # the value fits the column type the stage declares
    arr = pa.array([value, None], st.arrow_type)
    assert arr.to_pylist() == [{"product": "printer", "count": 2, "tags": ["fire"]}, None]


@pytest.mark.parametrize("text, message", [
    ('{"product": "printer", "count": ', "not valid JSON"),
    ("not json", "not valid JSON"),
    ('{"product": "printer", "count": 2} trailing', "not valid JSON"),
    ('{"product": "printer"}', "'count' is a required property"),
    ('{"product": "printer", "count": "two"}', "at count"),
    ('{"product": "printer", "count": 2.5}', "at count"),
    ('{"product": "printer", "count": true}', "at count"),
    ('{"product": "printer", "count": 1, "tags": [1]}', "at tags/0"),
    ('{"product": "a\nb", "count": 1}', "not valid JSON"),  # raw control character in a string
    ('{"product": "printer", "count": 9223372036854775808}', "does not fit in int64"),
    ('{"product": "printer", "count": -9223372036854775809}', "does not fit in int64"),
    ('{"product": "printer", "count": ' + "9" * 5000 + "}", "cannot be read as JSON"),  # Python's digit limit
    ('[' * 100_000, "cannot be read as JSON"),  # nesting beyond the recursion limit
    ('{"product": "printer", "count": 1e300}', "column cannot hold"),  # an "integer" to JSON Schema
])
def test_json_invalid_keeps_the_raw_text(tmp_path, text, message):
    st = stage(tmp_path, SCHEMA_STAGE)
    with pytest.raises(OutputInvalid) as e:
        st.parse(chat_reply(text))
    assert message in str(e.value)
    assert e.value.raw == text


def test_json_int64_bounds_are_accepted(tmp_path):
    st = stage(tmp_path, SCHEMA_STAGE)
    for n in (2**63 - 1, -(2**63)):
        assert st.validate(json.dumps({"product": "p", "count": n}))["count"] == n
    value = st.validate('{"product": "p", "count": 2.0}')  # an integer to JSON Schema, and to Arrow
    assert pa.array([value], st.arrow_type).to_pylist() == [{"product": "p", "count": 2, "tags": None}]


def test_json_escaped_control_characters_and_non_finite_numbers(tmp_path):
    st = stage(tmp_path, SCHEMA_STAGE)
    assert st.validate('{"product": "a\\nb", "count": 1}')["product"] == "a\nb"
    num = stage(tmp_path, """
        - name: s
          model: gen
          prompt: "{{ text }}"
          json_schema: {type: object, properties: {x: {type: number}}}
          output: o
    """)
    assert num.validate('{"x": 1.5}') == {"x": 1.5}
    for bad in ('{"x": NaN}', '{"x": Infinity}', '{"x": -Infinity}'):
        with pytest.raises(OutputInvalid):
            num.validate(bad)


def test_truncated_reply_is_mentioned_whatever_the_failure(tmp_path):
    st = stage(tmp_path, SCHEMA_STAGE)
    with pytest.raises(OutputInvalid, match="max_tokens") as e:
        st.parse(chat_reply('{"product": "prin', finish_reason="length"))
    assert e.value.raw == '{"product": "prin'
    # a truncated reply can still be valid JSON that fails the schema
    with pytest.raises(OutputInvalid, match="max_tokens"):
        st.parse(chat_reply('{"product": "p"}', finish_reason="length"))
    with pytest.raises(OutputInvalid) as e:
        st.parse(chat_reply('{"product": "p"}', finish_reason="stop"))
    assert "max_tokens" not in str(e.value)


def test_invalid_json_schema_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        stage(tmp_path, """
            - name: s
              model: gen
              prompt: "{{ text }}"
              json_schema: {type: wrongtype}
              output: o
        """)


# --- output types ------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, expected", [
    ({"type": "integer"}, pa.int64()),
    ({"type": "number"}, pa.float64()),
    ({"type": "string"}, pa.string()),
    ({"type": "boolean"}, pa.bool_()),
    ({"enum": ["a", "b"]}, pa.string()),
    ({"type": "string", "enum": ["a", "b", None]}, pa.string()),
    ({"const": "x"}, pa.string()),
    ({"type": ["string", "null"]}, pa.string()),
    ({"type": ["null", "integer"]}, pa.int64()),
    ({"type": "array", "items": {"type": "number"}}, pa.list_(pa.float64())),
    ({"type": "object", "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "scores": {"type": "array", "items": {"type": "number"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "ok": {"type": "boolean"}}},
        "kind": {"enum": ["a", "b"]},
    }}, pa.struct([
        ("name", pa.string()), ("age", pa.int64()), ("scores", pa.list_(pa.float64())),
        ("address", pa.struct([("city", pa.string()), ("ok", pa.bool_())])), ("kind", pa.string()),
    ])),
])
def test_arrow_type_of_schema(schema, expected):
    assert arrow_type_of_schema(schema) == expected


@pytest.mark.parametrize("schema, expected", [
    ({"enum": [1, 2, 3]}, pa.int64()),
    ({"type": "integer", "enum": [1, 2]}, pa.int64()),
    ({"enum": [0.5, 1]}, pa.float64()),
    ({"enum": [True, False]}, pa.bool_()),
    ({"const": 3}, pa.int64()),
])
def test_enums_of_non_strings_are_typed_by_their_values(schema, expected):
    typ = arrow_type_of_schema(schema)
    assert typ == expected
    values = schema.get("enum") or [schema["const"]]
    assert pa.array(values, typ).to_pylist() == values


@pytest.mark.parametrize("schema, message", [
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "cannot type"),
    ({"type": ["string", "integer"]}, "cannot be typed as one column type"),
    ({"type": "object"}, "needs properties"),
    ({"type": "object", "properties": {}}, "needs properties"),
    ({"type": "array"}, "needs items"),
    ({}, "cannot type"),
    ({"type": "null"}, "cannot type"),
    ({"enum": ["a", 1]}, "enum"),
    ({"enum": [{"a": 1}]}, "enum"),
    ({"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}]}}}, "json_schema.properties.x"),
])
def test_untypeable_schemas_are_refused(schema, message):
    with pytest.raises(ConfigError, match=message):
        arrow_type_of_schema(schema)


def test_untypeable_schema_in_a_stage_names_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.s\.json_schema\.properties\.x"):
        stage(tmp_path, """
            - name: s
              model: gen
              prompt: "{{ text }}"
              json_schema: {type: object, properties: {x: {anyOf: [{type: string}, {type: integer}]}}}
              output: o
        """)


# --- lineage hashes ----------------------------------------------------------------------------


def hashed(tmp_path: Path, prompt: str = "Classify {{ text }}", params: str = "{temperature: 0}",
           extra: str = "choice: [a, b]", system: str | None = None) -> tuple[str, str]:
    st = stage(tmp_path, f"""
        - name: s
          model: gen
          prompt: "{prompt}"
          {f'system: "{system}"' if system else ''}
          params: {params}
          {extra}
          output: o
    """)
    assert len(st.prompt_sha256) == 64 and len(st.params_sha256) == 64
    return st.prompt_sha256, st.params_sha256


def test_lineage_hashes(tmp_path):
    prompt, params = hashed(tmp_path)
    assert hashed(tmp_path) == (prompt, params)  # stable across constructions
    p2, q2 = hashed(tmp_path, prompt="Classify: {{ text }}")
    assert p2 != prompt and q2 == params
    p3, q3 = hashed(tmp_path, params="{temperature: 0.5}")
    assert p3 == prompt and q3 != params
    p4, q4 = hashed(tmp_path, params="{temperature: 0, max_tokens: 4}")
    assert p4 == prompt and q4 not in (params, q3)
    p5, q5 = hashed(tmp_path, extra="choice: [a, b, c]")
    assert p5 == prompt and q5 != params  # the constraint shapes the output like a parameter
    p6, q6 = hashed(tmp_path, system="Be brief.")
    assert p6 != prompt and q6 == params
    # the served name and the base folder are not part of either hash
    st = stage(tmp_path / "elsewhere", """
        - name: s
          model: gen
          prompt: "Classify {{ text }}"
          params: {temperature: 0}
          choice: [a, b]
          output: o
    """, served="another-name")
    assert (st.prompt_sha256, st.params_sha256) == (prompt, params)


def test_params_hash_ignores_key_order(tmp_path):
    a = hashed(tmp_path, params="{temperature: 0, max_tokens: 4}")
    b = hashed(tmp_path, params="{max_tokens: 4, temperature: 0}")
    assert a == b


def test_a_stages_bodies_differ_only_in_the_prompt_and_are_keyed_as_such(tmp_path):
    """The request cache keys a stage's bodies by what ``Stage.request`` leaves unchanged."""
    from modelyard.cache import StageKeys, request_key

    for body in ("""
        - name: c
          model: gen
          output: label
          prompt: "Classify: {{ text }}"
          system: "You are {{ lang }}"
          choice: [bug, other]
          params: {temperature: 0, max_tokens: 4}
        """, """
        - name: c
          model: gen
          api: completion
          output: label
          prompt: "Classify: {{ text }}"
          params: {temperature: 0}
        """):
        st = stage(tmp_path, body)
        keys = StageKeys("m", "r", st.path, st.body_of(None), st.prompt_field)
        bodies = [st.request({**ROW, "text": t})[1] for t in ("a", "b")]
        assert {k for k in bodies[0] if bodies[0][k] != bodies[1][k]} == {st.prompt_field}
        for b in bodies:
            assert keys(st.path, b) == request_key("m", "r", st.path, b) and keys._same_rest(b)
