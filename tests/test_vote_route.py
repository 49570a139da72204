"""Votes and per-row routes on two real vLLM CPU servers (builtin:tiny-llama as `small`,
builtin:small-llama as `big`), counting what each server received from its own /metrics."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter

import pyarrow.dataset as ds
import pytest

from tests.conftest import requests_served, run_cli
from tests.test_cascade import ROWS, config, counted, run
from tests.test_cascade import two as two  # noqa: F401,PLC0414  (the two-server fixture)

pytestmark = pytest.mark.engine

TOPICS = ["work", "life", "money", "other"]
TOPIC_VOTE = f"""
  - name: topic
    prompt: "Topic of: {{{{ body }}}}"
    choice: {TOPICS}
    params: {{temperature: 0, max_tokens: 4}}
    vote: {{models: [small, big]}}
    output: topic
"""  # a vote of the two models on a choice, greedy


def majority(values: list) -> tuple:
    counts = Counter(json.dumps(v, sort_keys=True) for v in values)
    best = max(counts.values())
    return next(v for v in values if counts[json.dumps(v, sort_keys=True)] == best), best


def test_a_vote_of_two_models_and_a_vote_of_three_samples(two, prefect_harness, tmp_path):
    stages = TOPIC_VOTE + f"""
  - name: mood
    prompt: "Mood of: {{{{ body }}}}"
    choice: [calm, angry, happy]
    params: {{temperature: 1.0, max_tokens: 8}}
    vote: {{model: small, samples: 3}}
    output: mood
"""
    cfg = config(tmp_path, two, stages)
    (manifest, rows), to_tiny, to_small = counted(two, lambda: run(cfg))
    # every voter once per row; the three samples are one request with n: 3, which vLLM runs (and counts)
    # as three requests
    assert to_tiny == ROWS + 3 * ROWS and to_small == ROWS
    for r in rows:
        for stage, out, voters in (("topic", "topic", ["small", "big"]), ("mood", "mood", ["small"] * 3)):
            lin = r["_lineage"][stage]
            assert [e["model"] for e in lin["tiers"]] == voters and all(e["role"] == "voter" for e in lin["tiers"])
            answers = [e["answer"] for e in lin["tiers"] if e["reason"] in ("agrees", "disagrees")]
            if not answers:  # sampled at temperature 1, a choice can be spelled out in more tokens than max_tokens
                assert r[out] is None and lin["error"].startswith("every voter failed")
                assert all(e["reason"] in ("invalid", "failed") for e in lin["tiers"])
                continue
            value, n = majority(answers)
            assert r[out] == value and lin["confidence"] == pytest.approx(n / len(voters))
            assert lin["tiers"][lin["tier"]]["answer"] == value  # the earliest voter of the majority
            assert lin["tier"] == next(i for i, e in enumerate(lin["tiers"]) if e["answer"] == value)
            # the stage took its slowest voter's time, not the sum: the voters went out together
            lat = [e["latency_ms"] for e in lin["tiers"]]
            assert lin["latency_ms"] == pytest.approx(max(lat))
    moods = [[e["answer"] for e in r["_lineage"]["mood"]["tiers"]] for r in rows]
    assert any(len(set(m)) > 1 for m in moods)  # sampled: the samples differ
    hist = manifest["stages"]["topic"]["agreement"]
    assert sum(hist.values()) == ROWS
    assert hist == dict(Counter(f"{r['_lineage']['topic']['confidence']:.2f}" for r in rows))
    # a rerun asks nothing and draws no new samples: the n-sample request is cached
    (_, again), to_tiny, to_small = counted(two, lambda: run(cfg))
    assert to_tiny == to_small == 0
    assert [r["mood"] for r in again] == [r["mood"] for r in rows]


def test_a_json_vote_is_decided_field_by_field_and_ties_go_to_the_earlier_model(two, prefect_harness, tmp_path):
    stage = """
  - name: details
    prompt: "Details of: {{ body }}"
    json_schema:
      type: object
      properties: {kind: {enum: [bug, billing, other]}, urgent: {type: boolean}}
      required: [kind, urgent]
    params: {temperature: 0, max_tokens: 24}
    vote: {models: [small, big]}
    output: details
"""
    cfg = config(tmp_path, two, stage)
    manifest, rows = run(cfg)
    ties = 0
    for r in rows:
        lin = r["_lineage"]["details"]
        answers = [json.loads(e["answer"]) for e in lin["tiers"] if e["reason"] in ("agrees", "disagrees")]
        if len(answers) < 2 or r["details"] is None:
            continue
        want = {k: majority([a.get(k) for a in answers])[0] for k in ("kind", "urgent")}
        assert r["details"] == want
        if answers[0] != answers[1]:
            ties += 1
            assert r["details"] == answers[0]  # one against one: the earlier model wins every field
            assert lin["confidence"] == pytest.approx(0.5)
    print(f"JSON vote: {ties} rows where the two models disagreed")
    assert ties  # the tie rule was exercised


def test_a_route_by_prompt_length_sends_each_server_exactly_its_rows(two, prefect_harness, tmp_path):
    stage = """
  - name: summary
    prompt: "Summarize: {{ body }}"
    params: {temperature: 0, max_tokens: 4}
    route:
      - {when: "body | length > 60", model: big}
      - {model: small}
    output: summary
"""
    cfg = config(tmp_path, two, stage)
    (manifest, rows), to_tiny, to_small = counted(two, lambda: run(cfg))
    long = [r for r in rows if len(r["body"]) > 60]
    assert 0 < len(long) < ROWS
    assert to_small == len(long) and to_tiny == ROWS - len(long)
    for r in rows:
        lin = r["_lineage"]["summary"]
        assert lin["tier"] == (0 if len(r["body"]) > 60 else 1)
        assert lin["tiers"][0]["model"] == ("big" if lin["tier"] == 0 else "small")
    routes = manifest["stages"]["summary"]["routes"]
    assert [x["rows"] for x in routes] == [len(long), ROWS - len(long)]
    out = run_cli("inspect", manifest["output"]["uri"])
    assert out.returncode == 0, out.stderr
    note = [line for line in out.stdout.splitlines() if line.startswith("summary: rule")]
    assert note == [f"summary: rule 0 (body | length > 60) -> big: {len(long)}; rule 1 (else) -> small: "
                    f"{ROWS - len(long)}"], out.stdout


def test_sigkill_in_a_vote_then_resume_re_asks_no_voter_that_had_answered(two, prefect_server, tmp_path):
    stage = TOPIC_VOTE
    cfg = config(tmp_path, two, stage, shard_rows=30)
    env = {"PREFECT_API_URL": prefect_server}
    r = run_cli("run", str(cfg), env={**env, "MODELYARD_FAILPOINT": "reply:topic@big:10"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    with sqlite3.connect(tmp_path / "_modelyard" / "out" / "cache.sqlite") as db:
        kept = dict(db.execute("select model, count(*) from replies group by model").fetchall())
    t1, s1 = requests_served(two["tiny"]), requests_served(two["small"])
    r = run_cli("run", str(cfg), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    resent_tiny, resent_small = requests_served(two["tiny"]) - t1, requests_served(two["small"]) - s1
    print(f"vote killed: answers kept {kept}; the resume asked tiny {resent_tiny}, small {resent_small}")
    # a voter's reply is on disk before the vote goes on (the kill came as big's tenth reply arrived)
    assert kept.get(two["small"].served_name, 0) >= 10
    assert resent_tiny == ROWS - kept.get(two["tiny"].served_name, 0)
    assert resent_small == ROWS - kept[two["small"].served_name]
    rows = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert rows.num_rows == ROWS
