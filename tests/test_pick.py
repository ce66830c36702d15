"""`edgequant pick`: the best rung under constraints, on rows of a real SQLite store built here.

Every expected answer below is worked out by hand from the table in LADDER (see the comments),
not taken from the code's output.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from edgequant.core.errors import BadInput
from edgequant.results.pick import choose, constraints, pareto_front, parse_size, pick
from edgequant.results.report import per_device, summarize
from edgequant.results.store import Measurement, RowKey, Store

MiB = 1024 * 1024
GiB = 1024 * MiB
HOST = "host:testbox"
PHONE = "adb:R58M123ABC"

# rung: size MiB, tg t/s, peak RSS MiB, xml parse rate, referral agreement with the reference
LADDER = {
    "BF16":   (1000, 20.0, 1200, 1.00, None),
    "Q8_0":   (540, 30.0, 700, 1.00, 1.00),
    "Q6_K":   (420, 33.0, 580, 1.00, 0.90),
    "Q5_K_M": (450, 31.0, 600, 0.95, 0.90),
    "Q4_K_M": (300, 40.0, 450, 0.95, 0.90),
    "Q4_0":   (280, 45.0, 430, 0.60, 0.50),
}
# default quality = mean of the rates; the reference agrees with itself (1.0):
# BF16 1.0, Q8_0 1.0, Q6_K 0.95, Q5_K_M 0.925, Q4_K_M 0.925, Q4_0 0.55


def _key(quant: str, device_id: str, quality: bool = False) -> RowKey:
    phone = device_id.startswith("adb:")
    device = ({"kind": "android", "serial": "R58M123ABC", "model": "SM-A515F"} if phone
              else {"kind": "host", "hostname": "testbox", "cpu_model": "Test CPU", "physical_cores": 2})
    params = {"runner": "device" if phone else "host", "threads": 2, "n_prompt": 64, "n_gen": 16}
    if quality:
        params = {"runner": "host", "stage": "quality", "suite": "triage", "n_cases": 20}
    return RowKey(model_id="org/m", model_hash="h", quant=quant, artifact_sha256="sha-" + quant,
                  is_reference=quant == "BF16", device_id=device_id, device=device, runtime="llama.cpp",
                  runtime_version="0.3.36", params=params)


def _bench(size: float, tg: float, rss: float) -> list[Measurement]:
    return [Measurement("size", size * MiB, "bytes"), Measurement("tg_tps", tg, "t/s", 0.3, 3),
            Measurement("pp_tps", tg * 10, "t/s", 1.0, 3), Measurement("ttft", 40.0, "ms", 1.0, 3),
            Measurement("peak_rss", rss * MiB, "bytes"), Measurement("peak_rss_anon", 50 * MiB, "bytes")]


def make_run(store: Store, quality: bool = True, phone: bool = False) -> str:
    run_id = store.start_run("edgequant run", "default", "org/m", "h")
    for quant, (size, tg, rss, xml, agree) in LADDER.items():
        store.record_rung(run_id, _key(quant, HOST), _bench(size, tg, rss))
        if phone:
            store.record_rung(run_id, _key(quant, PHONE), _bench(size, tg / 5, rss))
        if quality:
            rows = [Measurement("xml_parse_rate", xml, "ratio", None, 20)]
            if agree is not None:
                rows.append(Measurement("referral_agreement", agree, "ratio", None, 20))
            store.record_rung(run_id, _key(quant, HOST, quality=True), rows, status=None)
    store.record_rung(run_id, _key("Q2_K", HOST), [Measurement("size", 200 * MiB, "bytes")], status="oom",
                      detail="killed by the kernel (out of memory)")
    store.finish_run(run_id, "complete")
    return run_id


@pytest.fixture()
def store(tmp_path):
    with Store(tmp_path / "results.db") as s:
        yield s


def by_quant(result) -> dict:
    return {c.rung.quant: c for c in result.candidates}


# ---------------------------------------------------------------------------
# the choice


def test_best_is_smallest_quality_loss_then_says_why_others_are_excluded(store):
    run_id = make_run(store)
    result = pick(store, run_id, None, constraints(min_tg=25, max_rss="600MiB", gates=("xml_parse_rate>=0.95",)))
    c = by_quant(result)
    # BF16 too slow and too big; Q8_0 too big (700 MiB); Q4_0 fails the gate; Q2_K ran out of memory.
    # Q6_K, Q5_K_M (600 MiB is allowed) and Q4_K_M qualify; Q6_K loses least: (0 + 0.10) / 2 = 0.05
    assert {q for q, x in c.items() if x.qualifies} == {"Q6_K", "Q5_K_M", "Q4_K_M"}
    assert result.best.rung.quant == "Q6_K"
    assert c["Q6_K"].loss == pytest.approx(0.05)
    assert c["Q4_K_M"].loss == pytest.approx(0.075)
    assert [m.constraint.gate.metric for m in c["BF16"].misses] == ["tg_tps", "peak_rss"]
    assert [m.constraint.gate.metric for m in c["Q8_0"].misses] == ["peak_rss"]
    assert c["Q8_0"].misses[0].distance == pytest.approx(100 / 600)
    assert [m.constraint.gate.metric for m in c["Q4_0"].misses] == ["xml_parse_rate"]
    assert c["Q4_0"].misses[0].distance == pytest.approx((0.95 - 0.60) / 0.95)
    assert "peak RSS ≤ 600.00 MiB: 700.00 MiB (16.7% off)" in c["Q8_0"].verdict()
    assert c["Q2_K"].failed and "oom" in c["Q2_K"].verdict() and not c["Q2_K"].qualifies


def test_equal_loss_goes_to_the_faster_rung(store):
    run_id = make_run(store)
    # on the xml parse rate alone BF16, Q8_0 and Q6_K all lose nothing; BF16 is too slow, Q6_K (33 t/s) beats Q8_0
    result = pick(store, run_id, "host", constraints(min_tg=25), quality="xml_parse_rate")
    assert result.best.rung.quant == "Q6_K"
    assert by_quant(result)["Q8_0"].loss == 0.0 and by_quant(result)["Q8_0"].qualifies


def test_reference_agrees_with_itself_on_agreement_gates(store):
    run_id = make_run(store)
    # referral agreement is not measured on the reference; it is 1 by definition, so BF16 passes the gate.
    # BF16 and Q8_0 both lose nothing (xml 1.0, agreement 1.0); Q8_0 is faster
    result = pick(store, run_id, None, constraints(gates=("referral_agreement>=0.95",), max_size="2GiB"))
    c = by_quant(result)
    assert c["BF16"].qualifies and c["Q8_0"].qualifies and not c["Q6_K"].qualifies
    assert result.best.rung.quant == "Q8_0"


def test_nothing_qualifies_names_the_closest_constraint(store):
    run_id = make_run(store)
    result = pick(store, run_id, None, constraints(min_tg=50, max_rss="600MiB"))
    assert result.best is None
    # shortfalls of tg against 50: BF16 60 %, Q8_0 40 %, Q6_K 34 %, Q5_K_M 38 %, Q4_K_M 20 %, Q4_0 10 %
    closest = result.closest()
    assert closest.rung.quant == "Q4_0"
    assert closest.gap == pytest.approx(0.10)
    msg = result.no_pick_message()
    assert "closest: Q4_0" in msg and "tg ≥ 50.0 t/s: 45.0 t/s (10.0% off)" in msg


def test_pareto_front_over_quality_speed_size(store):
    run_id = make_run(store)
    result = pick(store, run_id, None, [])
    # Q8_0 dominates BF16 (same quality, faster, smaller); Q6_K dominates Q5_K_M (better, faster, smaller);
    # Q2_K did not finish
    front = {c.rung.quant for c in result.candidates if c.pareto}
    assert front == {"Q8_0", "Q6_K", "Q4_K_M", "Q4_0"}
    assert result.best.rung.quant == "Q8_0"      # no constraints: BF16 and Q8_0 lose nothing, Q8_0 is faster


def test_pareto_front_function():
    pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 0.5), (2.0, 0.5), (1.0, 0.9)]
    # (0.5, 0.5) and (1.0, 0.9) are dominated by (1.0, 1.0); the two equal points dominate neither each other
    assert pareto_front(pts) == [True, True, False, True, False]
    assert pareto_front([(0.0, -math.inf), (0.0, 1.0)]) == [False, True]


def test_without_quality_figures_ranks_by_speed(store):
    run_id = make_run(store, quality=False)
    result = pick(store, run_id, None, constraints(max_size="350MiB"))
    assert result.best.rung.quant == "Q4_0"         # Q4_K_M (300) and Q4_0 (280) fit; Q4_0 is faster
    assert any("generation speed only" in n for n in result.notes)
    r = pick(store, run_id, None, constraints(gates=("xml_parse_rate>=0.5",)))
    assert r.best is None
    assert all("xml_parse_rate not measured" in c.verdict() for c in r.candidates if not c.failed)


def test_devices_and_shared_quality(store):
    run_id = make_run(store, phone=True)
    with pytest.raises(BadInput, match="2 devices.*--device"):
        pick(store, run_id, None, [])
    with pytest.raises(BadInput, match="matches none"):
        pick(store, run_id, "pixel", [])
    for spec in ("R58M123ABC", "adb:R58M123ABC", "sm-a515f"):
        assert pick(store, run_id, spec, []).device_id == PHONE
    assert pick(store, run_id, "host", []).device_id == HOST
    # the phone runs at a fifth of the host's speed; its quality is the host's (same GGUF files)
    result = pick(store, run_id, "R58M123ABC", constraints(min_tg=7, gates=("xml_parse_rate>=0.95",)))
    # tg: Q6_K 6.6, Q5_K_M 6.2, Q4_K_M 8.0, Q4_0 9.0; only Q4_K_M passes both
    assert result.best.rung.quant == "Q4_K_M"
    assert by_quant(result)["Q4_0"].misses[0].constraint.gate.metric == "xml_parse_rate"


# ---------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, expected", [("3GiB", 3 * GiB), ("500MB", 500_000_000), ("1.5 GiB", int(1.5 * GiB)),
                                            ("750mib", 750 * MiB), ("2gb", 2_000_000_000)])
def test_sizes(text, expected):
    assert parse_size(text, "--max-rss") == expected


@pytest.mark.parametrize("text", ["3000", "3XB", "GiB", "-1GiB", ""])
def test_bad_sizes(text):
    with pytest.raises(BadInput, match="--max-rss"):
        parse_size(text, "--max-rss")


def test_gates_use_the_suite_syntax():
    (c,) = constraints(gates=("xml_parse_rate >= 0.95",))
    assert (c.gate.metric, c.gate.op, c.gate.value) == ("xml_parse_rate", ">=", 0.95)
    with pytest.raises(BadInput, match="unknown metric 'tg_tps'.*xml_parse_rate"):
        constraints(gates=("tg_tps>=10",))
    with pytest.raises(BadInput, match="between 0 and 1"):
        constraints(gates=("xml_parse_rate>=2",))
    with pytest.raises(BadInput, match="--min-tg"):
        constraints(min_tg=-1)


def test_choose_on_a_single_report_is_pure(store):
    run_id = make_run(store)
    (rep,) = per_device(summarize(store, run_id))
    a = choose(rep, constraints(min_tg=35))
    b = choose(rep, constraints(min_tg=35))
    assert a.best.rung.quant == b.best.rung.quant == "Q4_K_M"   # Q4_K_M (40) and Q4_0 (45): Q4_K_M loses less


# ---------------------------------------------------------------------------
# through the CLI


def test_cli_pick(tmp_path):
    db = tmp_path / "results.db"
    with Store(db) as s:
        make_run(s)
    env = cli_env(tmp_path)
    r = run_cli("pick", "--db", str(db), "--min-tg", "25", "--max-rss", "600MiB", "--gate", "xml_parse_rate>=0.95",
                env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pick: Q6_K" in r.stdout
    assert "excluded: peak RSS ≤ 600.00 MiB" in r.stdout

    r = run_cli("pick", "--db", str(db), "--min-tg", "25", "--json", env=env, timeout=120)
    data = json.loads(r.stdout)
    assert data["pick"] == "Q8_0"
    assert {x["quant"]: x["qualifies"] for x in data["rungs"]}["BF16"] is False

    r = run_cli("pick", "--db", str(db), "--run", "last", "--min-tg", "50", env=env, timeout=120)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "no rung meets every constraint", "closest: Q4_0", "10.0% off")

    r = run_cli("pick", "--db", str(db), "--max-rss", "3000", env=env, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--max-rss", "3GiB")


def test_relative_gates_admit_only_a_pass_and_over_refusal_counts_as_one_minus_the_rate(store):
    run_id = store.start_run("edgequant run", "default", "org/m", "h")
    # over-refusal: BF16 0 of 100 in-scope cases refused; Q8_0 the same (paired table: 100 both right);
    # Q4_0 refuses 40 (40 right -> wrong); Q2_K identical to the reference but on 25 cases only
    tables = {"Q8_0": ([100, 0, 0, 0], 0.0, 100), "Q4_0": ([60, 0, 40, 0], 0.4, 100),
              "Q2_K": ([25, 0, 0, 0], 0.0, 25)}
    for quant, (size, tg) in {"BF16": (1000, 20.0), "Q8_0": (540, 30.0), "Q4_0": (280, 45.0),
                              "Q2_K": (200, 50.0)}.items():
        store.record_rung(run_id, _key(quant, HOST), _bench(size, tg, size + 100))
        table, value, n = tables.get(quant, (None, 0.0, 100))
        detail = {"paired": table} if table else None
        store.record_rung(run_id, _key(quant, HOST, quality=True),
                          [Measurement("over_refusal", value, "ratio", None, n, detail)], status=None)
    store.finish_run(run_id, "complete")
    result = pick(store, run_id, None, constraints(gates=("over_refusal <= ref + 0.05",)))
    c = by_quant(result)
    assert {q for q, x in c.items() if x.qualifies} == {"BF16", "Q8_0"}
    assert "FAIL (-40.0 pp)" in c["Q4_0"].verdict()
    assert "INCONCLUSIVE (~73 cases would tell)" in c["Q2_K"].verdict()
    # the quality score of over-refusal alone: 1 - 0.4 for Q4_0; its loss against the reference 0.4
    assert c["Q4_0"].score == pytest.approx(0.6) and c["Q4_0"].loss == pytest.approx(0.4)
    assert result.best.rung.quant == "Q8_0"       # no loss, faster than the reference
