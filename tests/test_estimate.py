"""Resources known and bounded, the time of a run known before it starts (issue 19, parts 3 and 4).

The estimate is checked against the documented per-parameter defaults and against a history written into a
real store (expected values computed here from those figures, not read back from the estimator); the
stages' peak RSS and time are checked as rows of a real run of the tiny Gemma 3; an OOM kill is emulated by
a test-side watchdog that SIGKILLs the benchmark or eval worker, as the kernel's OOM killer would.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli
from test_cli import tiny_profile
from test_quality import write_suite

from edgequant import estimate
from edgequant.core.errors import BadInput
from edgequant.profiles import load_profile
from edgequant.results.store import Measurement, RowKey, Store

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "profiles" / "quick.toml"


SMALL, LARGE = 268_098_176, 3_880_263_168       # the two models the build defaults were measured on


def _line(small_s: float, large_s: float, n: float) -> float:
    """The line through (SMALL, small_s) and (LARGE, large_s) at n."""
    return small_s + (large_s - small_s) * (n - SMALL) / (LARGE - SMALL)


def facts(n: int) -> estimate.ModelFacts:
    return estimate.ModelFacts("m", n, 0, 2 * n)


def by(est: estimate.RunEstimate, stage: str, quant: str) -> estimate.StageEstimate:
    return next(s for s in est.stages if s.stage == stage and s.quant == quant)


# ---------------------------------------------------------------------------
# the estimate


def test_without_history_the_documented_defaults_scale_with_the_parameter_count():
    profile = load_profile(str(QUICK))          # BF16, Q8_0, Q4_K_M, Q4_0; pp128 tg32, 3 reps + 1 warm-up
    n = 2 * 268_000_000
    est = estimate.estimate_run(facts(n), profile, None, place="host:test", store=None, memory_available=64 << 30)
    # build stages: lines through the two models measured (README): 268,098,176 and 3,880,263,168 parameters;
    # the converter 15.3 s and 48.4 s, Q4_K_M 2.8 s and 115.8 s, Q4_0 2.0 s and 19.1 s
    assert by(est, "convert", "BF16").seconds == pytest.approx(_line(15.3, 48.4, n))
    assert by(est, "quantize", "Q4_K_M").seconds == pytest.approx(_line(2.8, 115.8, n))
    assert by(est, "quantize", "Q4_0").seconds == pytest.approx(_line(2.0, 19.1, n))
    # below the small model: from the start-up (the converter's, where its line meets 0 parameters) in proportion
    tiny = estimate.estimate_run(facts(10_000_000), profile, None, place="host:test", memory_available=64 << 30)
    convert_start = 15.3 - (48.4 - 15.3) * SMALL / (LARGE - SMALL)
    assert by(tiny, "convert", "BF16").seconds == pytest.approx(convert_start + (15.3 - convert_start) * 1e7 / SMALL)
    assert by(tiny, "quantize", "Q4_0").seconds == pytest.approx(0.3 + 1.7 * 1e7 / SMALL)
    pp, tg = 950 / 2, 100 / 2
    # 0.6 s of start-up and the model's load (0.7 s, then 1.2 s per GiB read: Q8_0 is 9.5 bits a weight); then
    # 1 warm-up and 3 repetitions of the prompt; 3 of the 32 tokens and 1 warm-up token
    load_q8 = 0.7 + n * 9.5 / 8 / 2**30 * 1.2
    assert by(est, "bench", "Q8_0").seconds == pytest.approx(0.6 + load_q8 + 4 * 128 / pp + (3 * 32 + 1) / tg)
    # a float file is mapped, not read: 0.05 s per GiB
    assert by(est, "bench", "BF16").seconds == pytest.approx(0.6 + 0.7 + n * 2 / 2**30 * 0.05 + 4 * 128 / pp
                                                             + (3 * 32 + 1) / tg)
    assert {s.basis for s in est.stages} == {"default"}
    assert not [s for s in est.stages if s.stage.startswith("eval")]      # no suite, no eval
    # built already: nothing to convert or quantize
    cached = estimate.estimate_run(facts(n), profile, None, place="host:test", missing=[],
                                   memory_available=64 << 30)
    assert by(cached, "convert", "BF16").seconds == 0 and by(cached, "quantize", "Q4_0").basis == "cached"


def _key(quant: str, device_id: str) -> RowKey:
    return RowKey(model_id="m", model_hash="h", quant=quant, artifact_sha256="s" + quant, is_reference=False,
                  device_id=device_id, device={}, runtime="llama.cpp", runtime_version="x",
                  params={"runner": "host", "n_prompt": 64})


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """A new SQLite file, or a fresh database on the session's throwaway PostgreSQL server."""
    return str(tmp_path / "r.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_this_places_stored_speed_scales_to_another_model(target):
    store = Store(target)
    run = store.start_run("edgequant run", "p", "m", "h")
    # a 100M model measured here at pp 500 t/s and tg 50 t/s (Q8_0), converted in 20 s and quantized in 3 s
    store.record_rung(run, _key("Q8_0", "host:a"), [Measurement("pp_tps", 500, "t/s"),
                                                    Measurement("tg_tps", 50, "t/s"),
                                                    Measurement("load_time", 1.5, "s"),
                                                    Measurement("n_params", 100e6, "count")])
    store.record_stages(run, [estimate.stage_row("convert", "BF16", "host:a", 100_000_000, 20.0, 1e9),
                              estimate.stage_row("quantize", "Q8_0", "host:a", 100_000_000, 3.0, 1e9),
                              estimate.stage_row("quantize", "Q4_0", "host:a", 100_000_000, 9.0, 1e9,
                                                 status="oom")])      # not ok: not this place's speed
    profile = load_profile(str(QUICK))
    est = estimate.estimate_run(facts(200_000_000), profile, None, place="host:a", store=store,
                                memory_available=64 << 30)
    # one model size here: its time, scaled along the defaults' curve (below the small model: the start-up, then
    # in proportion to the parameters)
    convert_start = 15.3 - (48.4 - 15.3) * SMALL / (LARGE - SMALL)

    def convert_default(m: float) -> float:
        return convert_start + (15.3 - convert_start) * m / SMALL

    assert by(est, "convert", "BF16").seconds == pytest.approx(20.0 * convert_default(2e8) / convert_default(1e8))
    assert by(est, "convert", "BF16").basis == "history"
    q8 = 3.0 * (0.3 + 1.3 * 2e8 / SMALL) / (0.3 + 1.3 * 1e8 / SMALL)
    assert by(est, "quantize", "Q8_0").seconds == pytest.approx(q8)
    # Q4_0 was not built here (the oom row is not this place's speed): its default, at this place's pace for Q8_0
    q4_default, q8_default = 0.3 + 1.7 * 2e8 / SMALL, 0.3 + 1.3 * 2e8 / SMALL
    assert by(est, "quantize", "Q4_0").seconds == pytest.approx(q4_default * q8 / q8_default)
    # twice the parameters: half the tokens/s, and the load (1.5 s here) scaled along the defaults' curve (0.7 s,
    # then 1.2 s per GiB of a 9.5-bit Q8_0)
    def load_default(m: float, bits: float) -> float:
        return 0.7 + m * bits / 8 / 2**30 * 1.2

    load_q8 = 1.5 * load_default(2e8, 9.5) / load_default(1e8, 9.5)
    assert by(est, "bench", "Q8_0").seconds == pytest.approx(0.6 + load_q8 + 4 * 128 / 250 + (3 * 32 + 1) / 25)
    assert by(est, "bench", "Q8_0").basis == "history"
    # Q4_0 (5.5 bits) was not benchmarked here: its default load at this place's pace for Q8_0's
    load_q4 = load_default(2e8, 5.5) * load_q8 / load_default(2e8, 9.5)
    assert by(est, "bench", "Q4_0").seconds == pytest.approx(0.6 + load_q4 + 4 * 128 / 250 + (3 * 32 + 1) / 25)
    # another place has no history: the defaults
    other = estimate.estimate_run(facts(200_000_000), profile, None, place="phone:b", store=store,
                                  memory_available=64 << 30)
    assert by(other, "convert", "BF16").basis == "default"


def test_a_models_own_history_is_its_time_and_two_sizes_give_this_places_own_line(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    run = store.start_run("edgequant run", "p", "m", "h")
    small, big = 268_000_000, 3_880_000_000
    store.record_stages(run, [estimate.stage_row("convert", "BF16", "host:a", small, 15.0, 1e9),
                              estimate.stage_row("convert", "BF16", "host:a", big, 40.0, 1e9),
                              estimate.stage_row("convert", "BF16", "host:a", big, 44.0, 1e9),
                              estimate.stage_row("convert", "BF16", "host:a", big, 90.0, 1e9),
                              estimate.stage_row("quantize", "Q4_K_M", "host:a", small, 2.0, 1e9),
                              estimate.stage_row("quantize", "Q4_K_M", "host:a", big, 116.0, 1e9)])
    profile = load_profile(str(QUICK))

    def secs(n: int, stage: str, quant: str) -> float:
        est = estimate.estimate_run(facts(n), profile, None, place="host:a", store=store, memory_available=64 << 30)
        return by(est, stage, quant).seconds

    # the same model (within 5 % of its parameters): the median of its times, whatever the defaults say
    assert secs(big, "convert", "BF16") == pytest.approx(44.0)
    assert secs(int(big * 1.04), "quantize", "Q4_K_M") == pytest.approx(116.0)
    # a size between: the least-squares line through this place's points (x: parameters, y: seconds)
    xs, ys = [small, big, big, big], [15.0, 40.0, 44.0, 90.0]
    mx, my = sum(xs) / 4, sum(ys) / 4
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert secs(1_000_000_000, "convert", "BF16") == pytest.approx(my + slope * (1e9 - mx))
    # two points on a line: Q4_K_M's own start-up and slope at this place
    assert secs(2_000_000_000, "quantize", "Q4_K_M") == pytest.approx(2.0 + 114.0 * (2e9 - small) / (big - small))
    # below the smallest size that line would start below zero: the nearest size, along the defaults' curve
    along = (0.3 + 2.5 * 1e8 / SMALL) / (0.3 + 2.5 * small / SMALL)
    assert secs(100_000_000, "quantize", "Q4_K_M") == pytest.approx(2.0 * along)


def test_a_models_own_speed_comes_before_a_newer_run_of_another_size(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    small, big = 268_000_000, 3_880_000_000
    for n, pp, tg, load in ((big, 40.0, 6.0, 4.0), (small, 800.0, 75.0, 0.8)):     # the small model measured last
        run = store.start_run("edgequant run", "p", "m", "h")
        store.record_rung(run, _key("Q8_0", "host:a"), [Measurement("pp_tps", pp, "t/s"),
                                                        Measurement("tg_tps", tg, "t/s"),
                                                        Measurement("load_time", load, "s"),
                                                        Measurement("n_params", n, "count")])
    profile = load_profile(str(QUICK))

    def bench_s(n: int) -> float:
        est = estimate.estimate_run(facts(n), profile, None, place="host:a", store=store, memory_available=64 << 30)
        return by(est, "bench", "Q8_0").seconds

    # the big model's own pp 40 t/s, tg 6 t/s and 4 s load, not the newer small model's scaled to its size
    assert bench_s(big) == pytest.approx(0.6 + 4.0 + 4 * 128 / 40 + (3 * 32 + 1) / 6)
    # 2B parameters: the nearest size's tokens/s (the big model's: 1.94 x away against 7.46 x), inversely with
    # the parameters; the load along the line through both sizes' loads
    pp, tg = 40 * big / 2e9, 6 * big / 2e9
    load = 0.8 + (4.0 - 0.8) * (2e9 - small) / (big - small)
    assert bench_s(2_000_000_000) == pytest.approx(0.6 + load + 4 * 128 / pp + (3 * 32 + 1) / tg)


def test_a_suite_adds_the_eval_stages_with_the_teacher_beside_each_rung():
    from edgequant.profiles.suites import load_suite

    profile = load_profile(str(QUICK))
    suite = load_suite("triage")
    est = estimate.estimate_run(facts(268_000_000), profile, suite, place="host:test", memory_available=64 << 30)
    assert [s.quant for s in est.stages if s.stage == "eval-reference"] == ["BF16"]
    assert [s.quant for s in est.stages if s.stage == "eval-generate"] == ["Q8_0", "Q4_K_M", "Q4_0"]
    assert [s.quant for s in est.stages if s.stage == "eval-teacher"] == ["Q8_0", "Q4_K_M", "Q4_0"]
    # the teacher holds the reference and one rung: BF16 (16 bits) + Q8_0 (34-byte blocks of 32: 8.5 bits, plus
    # the ladder's one bit of headroom) of 268M, and a process
    teacher = by(est, "eval-teacher", "Q8_0")
    assert teacher.memory_bytes == pytest.approx(512 * 2**20 + 268e6 * 2 + 268e6 * 9.5 / 8, rel=0.01)
    # nothing built yet: the converter is the largest (1.5 GiB for torch and half the 536 MB of weights)
    assert by(est, "convert", "BF16").memory_bytes == 1.5 * 2**30 + 268e6
    assert est.largest.stage == "convert"
    built = estimate.estimate_run(facts(268_000_000), profile, suite, place="host:test", missing=[],
                                  memory_available=64 << 30)
    assert built.largest.stage == "eval-teacher" and built.largest.quant == "Q8_0"   # Q8_0: the largest rung


def test_the_teacher_estimate_counts_the_reference_once_per_group_that_fits():
    from edgequant.profiles.suites import load_suite

    profile = load_profile(str(QUICK))
    suite = load_suite("triage")

    def teacher_s(memory: int) -> list[float]:
        est = estimate.estimate_run(facts(268_000_000), profile, suite, place="host:test", memory_available=memory)
        return [s.seconds for s in est.stages if s.stage == "eval-teacher"]

    # 2 GiB: 60 % of it holds the reference (536 MB and a 512 MiB context) and no rung beside it, so each rung
    # runs in a group of its own: a start (4 s) and two passes of the same tokens at the same default speed
    alone = teacher_s(2 << 30)
    assert len(alone) == 3 and alone[0] == pytest.approx(alone[1]) == pytest.approx(alone[2])
    one_pass = (alone[0] - 4.0) / 2
    # 64 GiB: all three in one group, which starts once and passes the reference once: a third of each per rung
    together = teacher_s(64 << 30)
    assert together == pytest.approx([one_pass + (4.0 + one_pass) / 3] * 3)
    assert sum(together) == pytest.approx(4.0 + 4 * one_pass)


def test_disk_or_memory_short_is_one_line_naming_both_figures_and_the_folder(tmp_path):
    disk = [estimate.DiskNeed(tmp_path / "artifacts", 3 << 30, 1 << 30)]
    est = estimate.RunEstimate([], disk, 64 << 30, "host:test")
    with pytest.raises(BadInput) as err:
        estimate.check_resources(est)
    msg = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in msg
    # 3 GiB of files + the 256 MiB margin, 1 GiB free: 2.25 GiB short
    assert "needs about 3.25 GiB" in msg and "1.00 GiB is free" in msg and "2.25 GiB short" in msg
    assert str(tmp_path / "artifacts") in msg and "--cache-dir" in msg
    stage = estimate.StageEstimate("eval-teacher", "Q8_0", 1.0, 6 << 30, "default")
    with pytest.raises(BadInput, match=r"eval-teacher of Q8_0 needs about 6\.00 GiB of memory and only "
                                       r"4\.00 GiB is available, 2\.00 GiB short"):
        estimate.check_resources(estimate.RunEstimate([stage], [], 4 << 30, "host:test"))
    estimate.check_resources(estimate.RunEstimate([stage], [estimate.DiskNeed(tmp_path, 0, 0)], 8 << 30, "h"))


def test_the_time_left_follows_how_the_finished_stages_compared_with_their_estimates():
    stages = [estimate.StageEstimate("bench", q, s, 0, "default") for q, s in (("A", 10), ("B", 10), ("C", 20))]
    cd = estimate.Countdown(estimate.RunEstimate(stages, [], 0, "h"))
    assert cd.remaining() == 40
    cd.finish("bench", "A", 20.0)                # twice as slow as estimated
    assert cd.remaining() == pytest.approx(60.0)
    cd.finish("bench", "unknown", 10.0)          # no such rung: the first one left of that stage (B)
    assert cd.remaining() == pytest.approx(20 * 30 / 20)
    assert estimate.countdown_event("quantizing Q4_K_M") == (("quantize",), "Q4_K_M")
    assert estimate.countdown_event("hashing Q4_K_M") is None
    assert estimate.countdown_event("Q8_0", "eval triage")[0] == estimate.EVAL_STAGES
    # the reporter's view of it: a finished stage gives the time left as text, an event without an estimate none
    cd = estimate.Countdown(estimate.RunEstimate(
        [estimate.StageEstimate("quantize", "Q8_0", 100.0, 0, "default"),
         estimate.StageEstimate("bench", "Q8_0", 3600.0, 0, "default")], [], 0, "h"))
    assert cd.event("hashing Q8_0") is None
    assert cd.event("quantizing Q8_0") == "15 min 00 s"     # done at once: 0.25 x the hour left (the floor)


# ---------------------------------------------------------------------------
# the CLI: --dry-run, the refusal, the rows of a real run


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    res = run_cli("run", "--dry-run", "--no-quality", "--model", str(tiny_checkpoint), "--profile",
                  str(tiny_profile(tmp_path, types=["Q8_0", "Q4_0"])), env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "convert:" in out and "quantize:" in out and "bench:" in out and "eval-" not in out
    assert "Q8_0" in out and "Q4_0" in out and "disk:" in out and "memory:" in out and "time: about" in out
    assert not (tmp_path / "results.db").exists()
    assert not list((tmp_path / "cache").rglob("*.gguf"))


@pytest.fixture(scope="module")
def measured(tiny_checkpoint, tmp_path_factory):
    """One `edgequant run` of the tiny model with a 7-case suite; its stderr is a log (not a terminal)."""
    tmp = tmp_path_factory.mktemp("measured")
    env = cli_env(tmp)
    profile = tiny_profile(tmp, types=["Q8_0", "Q4_0"], repetitions=3, n_prompt=16, n_gen=4)
    t0 = time.monotonic()
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite",
                  str(write_suite(tmp)), env=env)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(tmp / "results.db", "SELECT run_id FROM runs")
    return {"tmp": tmp, "env": env, "res": res, "wall": wall, "run_id": run["run_id"], "db": tmp / "results.db"}


@pytest.mark.slow
def test_every_stage_of_a_run_is_a_row_with_its_peak_rss_and_time(measured):
    rows = db_rows(measured["db"], "SELECT * FROM stage_resources WHERE run_id = ? ORDER BY id",
                   measured["run_id"])
    got = [(r["stage"], r["quant"]) for r in rows]
    for expected in [("convert", "BF16"), ("quantize", "Q8_0"), ("quantize", "Q4_0"), ("bench", "BF16"),
                     ("bench", "Q8_0"), ("bench", "Q4_0"), ("eval-reference", "BF16"),
                     ("eval-generate", "Q8_0"), ("eval-generate", "Q4_0")]:
        assert expected in got, got
    assert any(s == "eval-teacher" for s, _ in got)
    total = psutil.virtual_memory().total
    for r in rows:
        assert r["status"] == "ok" and not r["reused"]
        assert 0 < r["seconds"] < measured["wall"]
        # every stage is a Python process with llama.cpp or torch loaded: tens of MiB at least, never the machine;
        # a quantization's is its own memory, above what its forked process shares (tests/test_stage_resources.py)
        assert (0 if r["stage"] == "quantize" else 20 * 2**20) < r["peak_rss_bytes"] < total, r
    # the benchmark's own VmHWM and the stage row are the same figure
    hwm = {r["quant"]: r["value"] for r in db_rows(measured["db"], "SELECT quant, value FROM measurements"
                                                   " WHERE run_id = ? AND metric = 'peak_rss'", measured["run_id"])}
    for r in rows:
        if r["stage"] == "bench":
            assert r["peak_rss_bytes"] == hwm[r["quant"]]


@pytest.mark.slow
def test_the_plan_is_printed_first_and_every_stage_line_says_the_time_left(measured):
    err = measured["res"].stderr
    lines = err.splitlines()
    first_estimate = next(i for i, ln in enumerate(lines) if "estimate: time: about" in ln)
    first_stage = next(i for i, ln in enumerate(lines) if ln.startswith("• converting to BF16: done"))
    assert first_estimate < first_stage
    for prefix in ("• converting to BF16: done", "• quantizing Q8_0: done", "• benchmarking Q4_0: ok",
                   "• eval mini Q4_0: ok"):
        line = next(ln for ln in lines if ln.startswith(prefix))
        assert "; run: about" in line and line.endswith("left"), line


@pytest.mark.slow
def test_report_shows_the_resources_table(measured):
    from rich.console import Console

    from edgequant.results import report

    with Store(measured["db"]) as store:
        rep = report.summarize(store, measured["run_id"])
    console = Console(file=io.StringIO(), width=200, record=True)
    report.render_table(rep, console)
    text = console.export_text()
    assert "resources: peak RSS and time of each stage" in text
    table = text.split("resources: peak RSS and time of each stage", 1)[1]
    assert "convert" in table and "eval-teacher" in table and "Q4_0" in table
    assert json.loads(report.render_json(rep))["resources"][0]["stage"] == "convert"


@pytest.mark.slow
def test_a_second_run_stores_the_reused_builds_with_the_time_they_took(measured, tiny_checkpoint):
    tmp = measured["tmp"]
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(tmp / "tiny.toml"),
                  env=measured["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    runs = db_rows(measured["db"], "SELECT run_id FROM runs ORDER BY started_at")
    second = runs[-1]["run_id"]
    first = {(r["stage"], r["quant"]): r for r in db_rows(measured["db"], "SELECT * FROM stage_resources"
                                                          " WHERE run_id = ?", measured["run_id"])}
    again = {(r["stage"], r["quant"]): r for r in db_rows(measured["db"], "SELECT * FROM stage_resources"
                                                          " WHERE run_id = ?", second)}
    for key in (("convert", "BF16"), ("quantize", "Q8_0")):
        assert again[key]["reused"] == 1 and again[key]["seconds"] == first[key]["seconds"]
    assert "estimate: convert: 0 s (cached)" in res.stderr


def test_a_disk_too_small_refuses_quantize_before_writing(tiny_checkpoint, tmp_path):
    """The shortfall is one line naming what is needed (margin included), what is free and the folder."""
    import os

    cache = tmp_path / "small"
    cache.mkdir()
    if os.system(f"mount -t tmpfs -o size=8M tmpfs {cache} 2>/dev/null") != 0:
        pytest.fail("cannot mount a small tmpfs to simulate a small disk (tests must run as root)")
    try:
        res = run_cli("quantize", "--model", str(tiny_checkpoint), "--cache-dir", str(cache), "--profile",
                      str(tiny_profile(tmp_path, types=["Q4_0"])), env=cli_env(tmp_path))
        assert res.returncode == 2, res.stderr
        line = assert_one_line_error(res.stderr, "needs about", "256 MiB margin", "is free", "short",
                                     str(cache / "artifacts"))
        assert "GiB short" in line
        assert not list(cache.rglob("*.gguf")) and not (cache / "artifacts").exists()
    finally:
        os.system(f"umount {cache}")


# ---------------------------------------------------------------------------
# OOM: a worker killed by SIGKILL that we did not send


class OomKiller:
    """A test-side watchdog standing in for the kernel's OOM killer: SIGKILLs the first child process of this
    test running ``module`` (``None``: a fork of this process itself, same command line) once it has run
    ``after`` seconds."""

    def __init__(self, module: str | None, after: float = 0.0):
        self.module, self.after = module, after
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        mine = me.cmdline()
        while not self._stop.wait(0.02) and not self.killed:
            for child in me.children(recursive=True):
                try:
                    cmd = child.cmdline()
                    ours = cmd == mine if self.module is None else self.module in " ".join(cmd)
                    if ours and time.time() - child.create_time() > self.after:
                        child.send_signal(signal.SIGKILL)
                        self.killed.append(child.pid)
                        return
                except psutil.Error:
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


@pytest.fixture(scope="module")
def tiny_ladder(tiny_checkpoint, tmp_path_factory):
    from edgequant.pipeline.prepare import ResolvedModel, build_ladder
    from edgequant.pipeline.scope import NullReporter
    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint

    tmp = tmp_path_factory.mktemp("oom")
    profile = load_profile(str(tiny_profile(tmp, types=["Q8_0", "Q4_0"], repetitions=3, n_prompt=16, n_gen=4)))
    ckpt = open_checkpoint(tiny_checkpoint)
    resolved = ResolvedModel(ckpt, checkpoint_hash(ckpt, tmp / "hashes.json"))
    return {"tmp": tmp, "profile": profile, "resolved": resolved,
            "artifacts": build_ladder(resolved, profile, tmp / "cache", NullReporter())}


@pytest.mark.slow
def test_a_benchmark_killed_by_the_oom_killer_is_stored_oom_and_the_run_goes_on(tiny_ladder, tmp_path):
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline.scope import NullReporter, RunScope

    store = Store(tmp_path / "r.db")
    run = store.start_run("edgequant run", "tiny", "m", "h")
    arts = tiny_ladder["artifacts"]
    with OomKiller("edgequant.bench.host_worker") as killer:
        out = pipeline.bench_rungs(RunScope(store, run, "m", "h", NullReporter()), arts, tiny_ladder["profile"])
    assert len(killer.killed) == 1
    statuses = {s["quant"]: s for s in store.rung_statuses(run)}
    assert statuses["BF16"]["status"] == "oom"                       # the first worker was the one killed
    assert "SIGKILL" in statuses["BF16"]["detail"] and "OOM killer" in statuses["BF16"]["detail"]
    assert statuses["Q8_0"]["status"] == "ok" and statuses["Q4_0"]["status"] == "ok"
    assert [o.status for o in out.outcomes] == ["oom", "ok", "ok"]
    stages = {(r["stage"], r["quant"]): r for r in store.stage_resources(run)}
    assert stages[("bench", "BF16")]["status"] == "oom" and stages[("bench", "BF16")]["peak_rss_bytes"] is None
    assert stages[("bench", "Q4_0")]["status"] == "ok" and stages[("bench", "Q4_0")]["peak_rss_bytes"] > 0


@pytest.mark.slow
def test_an_eval_worker_killed_by_the_oom_killer_is_stored_oom_with_its_stage(tiny_ladder, tmp_path):
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles.suites import load_suite

    store = Store(tmp_path / "r.db")
    run = store.start_run("edgequant run", "tiny", "m", "h")
    suite = load_suite(str(write_suite(tmp_path)))
    arts = tiny_ladder["artifacts"]
    # the reference's outputs first (not killed), then the watchdog takes the first rung's generation
    scope = RunScope(store, run, "m", "h", NullReporter())
    ref = pipeline.quality_rungs(scope, arts, tiny_ladder["profile"], suite, tmp_path / "cache", only={"BF16"})
    assert ref == {"BF16": "ok"}
    with OomKiller("edgequant.bench.eval_worker") as killer:
        statuses = pipeline.quality_rungs(scope, arts, tiny_ladder["profile"], suite, tmp_path / "cache",
                                          only={"Q8_0", "Q4_0"})
    assert len(killer.killed) == 1
    assert statuses == {"Q8_0": "oom", "Q4_0": "ok"}
    detail = {s["quant"]: s["detail"] for s in store.rung_statuses(run)}["Q8_0"]
    assert detail.startswith("quality:") and "SIGKILL" in detail and "OOM killer" in detail
    stages = [(r["stage"], r["quant"], r["status"]) for r in store.stage_resources(run)]
    assert ("eval-generate", "Q8_0", "oom") in stages and ("eval-generate", "Q4_0", "ok") in stages


@pytest.mark.slow
def test_a_quantization_killed_by_the_oom_killer_leaves_that_rung_out_and_the_ladder_goes_on(tiny_ladder,
                                                                                               tmp_path):
    """Each quantization runs in a forked process of its own: the watchdog's SIGKILL takes that rung (stored
    with its status and stage), not edgequant, and the next rung is made."""
    import shutil

    from edgequant.quantize.ladder import Ladder

    ref = tiny_ladder["artifacts"][0]
    resolved = tiny_ladder["resolved"]
    cache = tmp_path / "cache"
    folder = cache / "artifacts" / resolved.model_hash[:16]
    folder.mkdir(parents=True)
    shutil.copy2(ref.path, folder / ref.path.name)                 # the reference is built: only quantizations
    shutil.copy2(ref.path.with_name(ref.path.name + ".json"), folder / (ref.path.name + ".json"))
    ladder = Ladder(resolved.checkpoint, resolved.model_hash, tiny_ladder["profile"], cache)
    with OomKiller(None) as killer:
        arts = ladder.build(keep_going=True)
    assert len(killer.killed) == 1
    assert [a.quant for a in arts] == ["BF16", "Q4_0"]             # Q8_0, the first quantization, was killed
    ((quant, status, detail, built),) = ladder.failed
    assert (quant, status) == ("Q8_0", "oom")
    assert detail.startswith("quantize:") and "SIGKILL" in detail and "OOM killer" in detail
    assert not list(folder.glob("*Q8_0*")) and not list(folder.glob(".*partial*"))
    # the rung made after it: its own process's time and peak RSS (its own memory: what it allocated, not
    # the pages shared with this process; tests/test_stage_resources.py checks the figure)
    q4 = arts[1]
    assert q4.build["stage"] == "quantize" and q4.build["seconds"] > 0
    assert 0 < q4.build["peak_rss_bytes"] < psutil.Process().memory_info().rss


def test_a_killed_quantization_is_stored_as_that_rungs_status_and_a_stage_row(tmp_path):
    """What `run` stores for a rung ``build_ladder(failed=...)`` left out: its status with the stage, and the
    stage's row with the time and peak its process reached."""
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import NullReporter, RunScope

    store = Store(tmp_path / "r.db")
    run = store.start_run("edgequant run", "tiny", "m", "h")
    detail = "quantize: BF16.gguf to Q8_0 was killed (SIGKILL), most likely by the kernel's OOM killer"
    said = prepare.record_build_failures(RunScope(store, run, "m", "h", NullReporter()), 1000,
                                         [("Q8_0", "oom", detail, {"seconds": 2.5, "peak_rss_bytes": 3e9})])
    assert said == ["Q8_0 oom"]
    ((status,),) = [[s for s in store.rung_statuses(run)]]
    assert (status["quant"], status["status"], status["detail"]) == ("Q8_0", "oom", detail)
    ((row,),) = [store.stage_resources(run)]
    assert (row["stage"], row["quant"], row["status"], row["seconds"], row["peak_rss_bytes"]) == \
        ("quantize", "Q8_0", "oom", 2.5, 3e9)
