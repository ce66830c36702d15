"""`edgequant compare` judging speed on raw samples: the rank test and the practical threshold together,
too few samples said as such, a place's stored A/A noise floor as the threshold, and the table's stability
mark.  Runs are written with the real store; every expected verdict follows from the samples written here
(p-values worked out by hand: fully separated 3 vs 3 samples give p = 1/C(6,3) = 0.05)."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import cli_env, run_cli
from edgequant.results.store import Measurement, RowKey, Store

BENCH = {"runner": "host", "threads": 2, "n_prompt": 512, "n_gen": 128, "repetitions": 3, "warmup": 1}


def store_run(db, tg: list[float], pp: list[float] | None = None, status: str = "ok") -> str:
    pp = pp or [200.0, 201.0, 199.0]
    with Store(db) as s:
        run = s.start_run("edgequant bench", "default", "org/m", "h" * 64)
        key = RowKey("org/m", "h" * 64, "Q4_0", "q" * 64, False, "host:a", {}, "llama.cpp", "0.3.36", BENCH)
        rows = [Measurement(m, statistics.fmean(v), "t/s", statistics.stdev(v), len(v), {"samples": v})
                for m, v in (("pp_tps", pp), ("tg_tps", tg))]
        s.record_rung(run, key, rows, status=status, detail="noisy: test" if status == "noisy" else None)
        s.finish_run(run, "complete")
    return run


def gates(tmp_path, a, b, *extra):
    out = tmp_path / "c.json"
    r = run_cli("compare", a, b, "--db", str(tmp_path / "r.db"), "--json", str(out), *extra,
                env=cli_env(tmp_path), timeout=120)
    data = json.loads(out.read_text())
    return r, {g["gate"]: g for g in data["gates"]}


def test_a_significant_drop_beyond_the_threshold_is_a_regression(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [40.0, 41.0, 39.0])            # -20 % median, every sample lower: p = 0.05
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 1
    assert g["speed:tg_tps"]["status"] == "fail" and "p = 0.05" in g["speed:tg_tps"]["message"]
    assert "-20.0 %" in g["speed:tg_tps"]["message"]
    assert g["speed:pp_tps"]["status"] == "pass"


def test_significant_but_small_and_large_but_not_significant_both_pass(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    small = store_run(db, [48.5, 49.5, 47.5])        # every sample lower (p = 0.05) but only -3 %
    r, g = gates(tmp_path, a, small)
    assert r.returncode == 0 and g["speed:tg_tps"]["status"] == "pass"
    mixed = store_run(db, [52.0, 20.0, 21.0])        # median -58 % but one sample above all baseline ones
    r, g = gates(tmp_path, a, mixed)
    assert r.returncode == 0 and g["speed:tg_tps"]["status"] == "pass"
    # U = 6 (each baseline sample beats 20 and 21); of the 20 orderings of 3 vs 3, U = 6, 7, 8, 9 occur
    # 3, 2, 1, 1 times: P(U >= 6) = 7/20
    assert "p = 0.35" in g["speed:tg_tps"]["message"]


def test_too_few_samples_are_said_so_not_judged(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0], pp=[200.0, 201.0])
    b = store_run(db, [20.0, 21.0], pp=[100.0, 101.0])   # -60 %, but 2 vs 2 can never reach p = 0.05
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 0
    assert g["speed:tg_tps"]["status"] == "skip" and "too few samples" in g["speed:tg_tps"]["message"]


def test_a_noisy_rung_is_never_a_regression_and_never_missing(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [83.8, 84.0, 83.5])
    b = store_run(db, [11.5, 11.4, 11.6], status="noisy")
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 0
    assert g["speed:tg_tps"]["status"] == "skip" and "status noisy" in g["speed:tg_tps"]["message"]
    assert g["present"]["status"] == "pass"
    # a noisy baseline as well: still measured, still not judged
    r, g = gates(tmp_path, b, a)
    assert r.returncode == 0 and g["speed:tg_tps"]["status"] == "skip" and g["present"]["status"] == "pass"


def test_without_a_noise_floor_the_gates_judge_and_say_so(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [47.0, 47.5, 46.5])            # -6 %, p = 0.05: under the gates' 10 %
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 0 and g["speed:tg_tps"]["status"] == "pass"
    assert "no A/A noise floor stored for host:a" in g["speed:tg_tps"]["message"]
    assert "`edgequant noise`" in g["speed:tg_tps"]["message"]


def test_a_noise_floor_narrower_than_the_gates_does_not_lower_them(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [47.0, 47.5, 46.5])            # -6 %: beyond a 4 % floor, but not worth a regression
    with Store(db) as s:
        s.record_noise_floor("host:a", "Q4_0", "x" * 64, BENCH, {"tg_tps": (4.0, [50.0, 52.0, 51.0])})
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 0 and g["speed:tg_tps"]["status"] == "pass"
    assert "A/A noise floor of host:a (Q4_0) 4 %" in g["speed:tg_tps"]["message"]


def test_a_drop_within_a_wider_noise_floor_is_inconclusive_not_a_regression(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [40.0, 41.0, 39.0])            # -20 %, p = 0.05: beyond the gates' 10 %
    with Store(db) as s:                             # two runs of this rung here differ by up to 25 % by chance
        s.record_noise_floor("host:a", "Q4_0", "x" * 64, BENCH, {"tg_tps": (25.0, [50.0, 40.0, 45.0])})
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 0, r.stderr
    assert g["speed:tg_tps"]["status"] == "inconclusive"
    assert "A/A noise floor of host:a (Q4_0)" in g["speed:tg_tps"]["message"]
    assert "`compare --recheck`" in g["speed:tg_tps"]["message"]
    assert "1 inconclusive (speed within the noise of two single runs" in r.stdout
    with Store(db) as s:                             # a later, narrower floor of the same rung replaces it
        s.record_noise_floor("host:a", "Q4_0", "x" * 64, BENCH, {"tg_tps": (15.0, [50.0, 44.0, 47.0])})
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 1 and g["speed:tg_tps"]["status"] == "fail"


def test_the_rungs_own_floor_first_else_the_widest_of_the_place(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [40.0, 41.0, 39.0])            # Q4_0, -20 %
    with Store(db) as s:                             # other rungs' floors: the widest (30 %) stands in
        s.record_noise_floor("host:a", "BF16", "x" * 64, BENCH, {"tg_tps": (12.0, [50.0, 45.0, 48.0])})
        s.record_noise_floor("host:a", "Q8_0", "y" * 64, BENCH, {"tg_tps": (30.0, [50.0, 38.0, 45.0])})
        s.record_noise_floor("host:b", "Q4_0", "z" * 64, BENCH, {"tg_tps": (5.0, [50.0, 48.0, 49.0])})
    r, g = gates(tmp_path, a, b)
    assert g["speed:tg_tps"]["status"] == "inconclusive"
    assert "A/A noise floor of host:a (Q8_0)" in g["speed:tg_tps"]["message"]
    with Store(db) as s:                             # the rung's own floor, narrower, wins
        s.record_noise_floor("host:a", "Q4_0", "q" * 64, BENCH, {"tg_tps": (15.0, [50.0, 44.0, 47.0])})
    r, g = gates(tmp_path, a, b)
    assert r.returncode == 1 and g["speed:tg_tps"]["status"] == "fail"
    assert "A/A noise floor of host:a (Q4_0)" in g["speed:tg_tps"]["message"]


def test_the_floor_is_the_chance_drop_between_two_runs():
    from edgequant.noise import floor_pct

    # medians 100, 104, 96, 102, 98: median 100, range 8 %; sample sd sqrt((0 + 16 + 16 + 4 + 4) / 4) = 3.1623;
    # the normal quantile of 0.999 is 3.0902, so z * sqrt(2) * sd = 3.0902 * 1.4142 * 3.1623 = 13.82 %
    assert floor_pct([100.0, 104.0, 96.0, 102.0, 98.0]) == pytest.approx(13.82, abs=0.01)
    # two medians 100 and 110: range 100 * 10 / 105 = 9.52 %; sd 7.071, z * sqrt(2) * sd / 105 = 29.43 %
    assert floor_pct([100.0, 110.0]) == pytest.approx(29.43, abs=0.01)
    # 18 medians of 100 and one each of 90 and 110: sd sqrt(200 / 19) = 3.244, bound 14.18 %; the range, 20 %,
    # is wider and is the floor
    assert floor_pct([100.0] * 18 + [90.0, 110.0]) == pytest.approx(20.0)


def test_an_unstable_figure_is_marked_in_the_table(tmp_path):
    from rich.console import Console

    from edgequant.results.report import render_table, summarize

    db = tmp_path / "r.db"
    steady = store_run(db, [50.0, 50.5, 49.5])       # CV 1 %
    shaky = store_run(db, [40.0, 50.0, 60.0])        # CV 20 %
    for run, marked in ((steady, False), (shaky, True)):
        with Store(db) as s:
            console = Console(record=True, width=220, file=open("/dev/null", "w"))
            render_table(summarize(s, run), console)
        text = console.export_text()
        row = next(ln for ln in text.splitlines() if "Q4_0" in ln)
        assert ("50.0 ± 10.0 ~" in row) == marked and ("~ after a speed figure" in text) == marked, text


def test_pick_does_not_choose_a_rung_on_noisy_figures():
    from edgequant.results.pick import choose, constraints
    from edgequant.results.report import RunReport, RungSummary, Stat

    def rung(quant, tg, status):
        return RungSummary(quant, quant == "BF16", "host:a", status=status,
                           metrics={"tg_tps": Stat(tg), "size": Stat({"BF16": 500, "Q8_0": 270, "Q4_0": 150}[quant])})

    # Q4_0 looks fastest and smallest, but only because its figure was measured under contention
    rep = RunReport(run={"run_id": "r"}, rungs=[rung("BF16", 40.0, "ok"), rung("Q8_0", 60.0, "ok"),
                                               rung("Q4_0", 90.0, "noisy")],
                    params={}, device={}, runtime="llama.cpp", runtime_version="0", footnotes=[])
    result = choose(rep, constraints(min_tg=30.0))
    q4 = next(c for c in result.candidates if c.rung.quant == "Q4_0")
    assert q4.failed is not None and "other work loaded the machine" in q4.failed
    assert result.best is not None and result.best.rung.quant != "Q4_0"


def test_an_inconclusive_drop_is_flagged_for_the_recheck_and_its_verdict_decides(tmp_path):
    from edgequant.noise import Recheck, apply_recheck, flagged_pairs
    from edgequant.results.compare import compare_runs
    from edgequant.results.gates import load_gates

    db = tmp_path / "r.db"
    a = store_run(db, [50.0, 51.0, 49.0])
    b = store_run(db, [40.0, 41.0, 39.0])            # -20 %: within a 25 % floor
    steady = store_run(db, [50.5, 50.0, 49.5])       # the same as a: nothing to re-check
    with Store(db) as s:
        s.record_noise_floor("host:a", "Q4_0", "x" * 64, BENCH, {"tg_tps": (25.0, [50.0, 40.0, 45.0])})
        cmp = compare_runs(s, a, b, load_gates("gates"))
        assert [(p.quant, p.device_id) for p in flagged_pairs(cmp)] == [("Q4_0", "host:a")]
        assert flagged_pairs(compare_runs(s, a, steady, load_gates("gates"))) == []
    assert [r.gate for r in cmp.inconclusive] == ["speed:tg_tps"]
    apply_recheck(cmp, [Recheck("Q4_0", "host:a", "tg_tps", "fail", "re-check: -21 %")])
    assert [r.gate for r in cmp.regressions] == ["speed:tg_tps"] and not cmp.inconclusive
