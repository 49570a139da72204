"""Config loading and `modelyard validate`: good and bad files, no model called."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from modelyard.config import load_config, parse_params
from modelyard.errors import ConfigError
from modelyard.validate import check
from tests.conftest import ROOT, run_cli

BASE = """
name: t
input: {uri: INPUT, key: id}
models:
  m: {model: some/model, endpoints: ["http://127.0.0.1:9/v1"]}
  e: {model: builtin:minilm, task: embed}
stages:
  - name: s1
    model: m
    prompt: "Classify {{ text }}"
    choice: [a, b]
    output: label
  - name: s2
    model: m
    when: "label == 'a'"
    prompt: "Go {{ text }} {{ label }}"
    json_schema: {type: object, properties: {x: {type: integer}}, required: [x]}
    output: info
  - name: s3
    model: e
    input: "{{ text }}"
    output: vec
output: {uri: OUT}
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": f"k{i}", "text": f"row {i}"}) + "\n" for i in range(5)))
    return p


def write(tmp_path: Path, data: Path, text: str = BASE, **subs: str) -> Path:
    text = textwrap.dedent(text).replace("INPUT", str(data)).replace("OUT", str(tmp_path / "out"))
    for a, b in subs.items():
        text = text.replace(a, b)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_good_config_has_no_problems(tmp_path, data):
    loaded = load_config(write(tmp_path, data))
    assert check(loaded) == []
    assert [s.name for s in loaded.config.stages] == ["s1", "s2", "s3"]
    assert loaded.config.models["m"].in_flight == 96  # 1.5 x the 64 assumed of a server not described


def test_requests_in_flight_default_to_half_a_batch_more_than_the_engine_runs():
    from modelyard.config import ModelConfig

    assert ModelConfig.model_validate({"model": "x", "serve": {"max_num_seqs": 64}}).in_flight == 96
    assert ModelConfig.model_validate({"model": "x", "serve": {"max_num_seqs": 5}}).in_flight == 7
    assert ModelConfig.model_validate({"model": "x", "serve": {"max_num_seqs": 64}, "max_in_flight": 10}).in_flight == 10


def test_the_shipped_configs_validate():
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        r = run_cli("validate", str(cfg), "--param", "date=2026-11-27")
        assert r.returncode == 0, (cfg, r.stderr)
        assert "OK" in r.stdout


def test_unknown_key_is_named_with_its_path(tmp_path, data):
    p = write(tmp_path, data, **{"choice: [a, b]": "choice: [a, b]\n    temprature: 0"})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert any("stages[0].temprature: unknown key" in x for x in e.value.problems)


def test_every_problem_is_listed_and_exit_is_2(tmp_path, data):
    p = write(tmp_path, data, **{"{{ text }} {{ label }}": "{{ txt }} {{ label }}", "label == 'a'": "lable == 'a'",
                                 "type: integer": "type: wrongtype"})
    r = run_cli("validate", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "no column 'txt'" in r.stderr
    assert "no column 'lable'" in r.stderr
    assert "not a valid JSON schema" in r.stderr
    assert "stages[1]" in r.stderr


def test_template_reading_a_later_stage_output(tmp_path, data):
    p = write(tmp_path, data, **{"Classify {{ text }}": "Classify {{ info }}"})
    problems = check(load_config(p))
    assert any("'info' is written by this or a later stage" in x for x in problems)


def test_bad_model_reference_and_both_managed_and_external(tmp_path, data):
    p = write(tmp_path, data, **{"model: m\n    when": "model: nope\n    when"})
    with pytest.raises(ConfigError, match="'nope' is not one of models: m, e"):
        load_config(p)
    p = write(tmp_path, data, **{'endpoints: ["http://127.0.0.1:9/v1"]}': 'endpoints: ["http://127.0.0.1:9/v1"], serve: {}}'})
    with pytest.raises(ConfigError, match=r"models.m: give either endpoints"):
        load_config(p)


def test_duplicate_outputs_and_reserved_params(tmp_path, data):
    p = write(tmp_path, data, **{"output: info": "output: label"})
    with pytest.raises(ConfigError, match=r"column 'label' is also written by stages\[0\]"):
        load_config(p)
    p = write(tmp_path, data, **{"choice: [a, b]": "choice: [a, b]\n    params: {model: x}"})
    with pytest.raises(ConfigError, match="params may not set model"):
        load_config(p)


def test_param_placeholders(tmp_path, data):
    d = tmp_path / "dt=2026-01-02"
    d.mkdir()
    (d / "in.jsonl").write_text(data.read_text())
    p = write(tmp_path, data, **{str(data): '"' + str(tmp_path) + '/dt={date}/in.jsonl"'})
    with pytest.raises(ConfigError, match="needs parameter 'date'"):
        load_config(p, {})
    loaded = load_config(p, {"date": "2026-01-02"})
    assert loaded.config.input.uri.endswith("dt=2026-01-02/in.jsonl")
    assert check(loaded) == []
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_params(["novalue"])


def test_untypeable_json_schema_is_refused(tmp_path, data):
    p = write(tmp_path, data, **{"{type: object, properties: {x: {type: integer}}, required: [x]}":
                                 "{anyOf: [{type: string}, {type: integer}]}"})
    problems = check(load_config(p))
    assert any("cannot type" in x for x in problems)


def test_missing_config_file_and_bad_yaml(tmp_path):
    r = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    r = run_cli("validate", str(bad))
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
