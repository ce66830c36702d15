"""edgequant tune: the search's pruning and choice with our own build/measure callables (fakes of
edgequant's interface, not of llama.cpp), then the real thing on the tiny Gemma 3 through the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import assert_one_line_error, cli_env, ctrl_c, db_rows, run_cli, start_cli, wait_for
from test_imatrix import CASES, write_suite

from edgequant.bench import tune
from edgequant.core.errors import BadInput
from edgequant.core.paths import cache_dir
from edgequant.profiles.suites import parse_gate

# bytes per base type and the bonus of each modifier, for the fake builder
SIZES = {"Q8_0": 800, "Q6_K": 600, "Q5_K_M": 500, "Q4_K_M": 400, "Q3_K_M": 300, "Q2_K": 200}
EMB_EXTRA = 150


@dataclass
class Art:
    size_bytes: int


class Fake:
    """Quality falls with precision; +imatrix holds it up one level longer."""

    def __init__(self, quality: dict[str, float], tg: dict[str, float] | None = None):
        self.quality = quality
        self.tg = tg or {}
        self.built: list[str] = []
        self.measured: list[str] = []

    def build(self, spec):
        self.built.append(spec.name)
        return Art(SIZES[spec.base] + (EMB_EXTRA if spec.token_embedding_type else 0))

    def measure(self, spec, art):
        self.measured.append(spec.name)
        q = self.quality.get(spec.name, self.quality.get(spec.base, 0.0))
        return tune.Measured(art.size_bytes, {"xml_parse_rate": q}, self.tg.get(spec.name, 10.0), 100.0)


TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
GATE = [parse_gate("xml_parse_rate>=0.95")]


def run(fake, variants=("", "+imatrix"), **kw):
    return tune.search(tune.candidates(TYPES, variants), GATE, fake.build, fake.measure, **kw)


def test_smallest_passing_candidate_wins_and_failed_variants_stop_descending():
    fake = Fake({"Q8_0": 1, "Q6_K": 1, "Q5_K_M": 1, "Q4_K_M": 0.9, "Q4_K_M+imatrix": 0.97,
                 "Q3_K_M+imatrix": 0.5, "Q2_K": 1.0, "Q2_K+imatrix": 1.0})
    result = run(fake)
    assert result.best.name == "Q4_K_M+imatrix"
    by = {t.name: t for t in result.tried}
    assert by["Q4_K_M"].verdict == "fail" and "xml_parse_rate >= 0.95: 0.900" in by["Q4_K_M"].reasons
    # plain failed at Q4_K_M: Q3_K_M and Q2_K plain are not tried, even though Q2_K "would pass"
    assert "Q3_K_M" not in fake.built and "Q2_K" not in fake.measured
    assert by["Q2_K"].verdict == "skipped" and "Q4_K_M already failed" in by["Q2_K"].reasons[0]
    assert by["Q3_K_M+imatrix"].verdict == "fail" and "Q2_K+imatrix" not in fake.measured


def test_a_candidate_larger_than_a_passing_one_is_not_measured():
    fake = Fake({"Q8_0": 1, "Q6_K": 1, "Q5_K_M": 1, "Q4_K_M": 1, "Q3_K_M": 1, "Q2_K": 0,
                 "Q4_K_M+emb=Q8_0": 1})
    result = run(fake, variants=("", "+emb=Q8_0"))
    by = {t.name: t for t in result.tried}
    # at each level the stock type (e.g. Q4_K_M, 400) passes before its +emb=Q8_0 variant (550) is reached
    assert by["Q4_K_M+emb=Q8_0"].verdict == "skipped"
    assert "larger than Q4_K_M" in by["Q4_K_M+emb=Q8_0"].reasons[0]
    assert all(by[f"{t}+emb=Q8_0"].verdict == "skipped" for t in TYPES[1:])
    assert "Q4_K_M+emb=Q8_0" not in fake.measured and "Q8_0+emb=Q8_0" not in fake.built  # redundant
    assert result.best.name == "Q3_K_M"


def test_equal_sizes_are_decided_by_speed():
    fake = Fake({t: 1 for t in TYPES} | {"Q2_K": 0, "Q2_K+imatrix": 0},
                tg={"Q3_K_M": 40.0, "Q3_K_M+imatrix": 55.0})
    assert run(fake).best.name == "Q3_K_M+imatrix"


def test_max_size_and_min_tg_are_gates_too():
    fake = Fake({t: 1 for t in TYPES}, tg={"Q2_K": 5.0, "Q3_K_M": 20.0})
    result = run(fake, variants=("",), max_size=650, min_tg=8.0)
    by = {t.name: t for t in result.tried}
    assert by["Q8_0"].verdict == "skipped" and "over --max-size" in by["Q8_0"].reasons[0]
    assert by["Q2_K"].verdict == "fail" and "under --min-tg 8" in by["Q2_K"].reasons[0]
    assert result.best.name == "Q3_K_M"


def test_a_speed_failure_does_not_stop_the_variant_descending():
    """Too slow (--min-tg) or not runnable where it ships (its benchmark failed) at Q8_0 says nothing about a
    smaller, faster type: unlike a quality failure, the variant is still tried lower down."""
    fake = Fake({t: 1 for t in TYPES}, tg={"Q8_0": 3.0, "Q6_K": 4.0, "Q5_K_M": 9.0})
    oom = {"Q5_K_M"}
    measure = fake.measure

    def measure_or_oom(spec, art):
        m = measure(spec, art)
        if spec.name in oom:
            m.tg_tps, m.speed_failure = None, "speed not measured on adb:X: oom (killed)"
        return m

    result = tune.search(tune.candidates(("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"), ("",)), GATE, fake.build,
                         measure_or_oom, min_tg=8.0)
    by = {t.name: t for t in result.tried}
    assert by["Q8_0"].verdict == by["Q6_K"].verdict == "fail"
    assert by["Q8_0"].reasons == ["tg 3.0 t/s is under --min-tg 8"]
    # a failed benchmark rejects the candidate (with why) even though its quality passes, and is no tg gap
    assert by["Q5_K_M"].verdict == "fail" and by["Q5_K_M"].reasons == ["speed not measured on adb:X: oom (killed)"]
    assert fake.measured == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    assert result.best.name == "Q4_K_M"


def test_when_nothing_passes_the_closest_gate_and_candidate_are_named():
    fake = Fake({"Q8_0": 0.90, "Q8_0+imatrix": 0.93, "Q6_K": 0.2})
    result = run(fake)
    assert result.best is None
    msg = tune.no_pass_message(result, GATE)
    assert "xml_parse_rate >= 0.95 at Q8_0+imatrix" in msg and "0.02" in msg
    assert fake.measured == ["Q8_0", "Q8_0+imatrix"]


def test_types_that_need_an_imatrix_are_only_tried_with_one():
    names = [s.name for level in tune.candidates(("Q4_K_M", "IQ2_XS"), ("", "+imatrix")) for s in level]
    assert names == ["Q4_K_M", "Q4_K_M+imatrix", "IQ2_XS+imatrix"]


@pytest.mark.parametrize("text, expected", [("300M", 300 * 2**20), ("1.5G", int(1.5 * 2**30)),
                                            ("250MiB", 250 * 2**20), ("1000", 1000)])
def test_sizes(text, expected):
    assert tune.parse_size(text) == expected


def test_bad_size():
    with pytest.raises(BadInput, match="300 apples"):
        tune.parse_size("300 apples")


# ---------------------------------------------------------------------------
# the CLI


def test_tune_bad_input_is_one_line(tmp_path, tiny_checkpoint):
    env = cli_env(tmp_path)
    small = write_suite(tmp_path / "small", CASES[:2] + CASES[5:7])
    full = write_suite(tmp_path / "full")
    res = run_cli("tune", "--model", str(tiny_checkpoint), "--suite", str(small), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "has 4 cases", "at least 8")
    # --device takes run's device specs, one device: a bad spec, a pool, an unknown serial are one line
    for spec, needles in [("no good!", ("'no good!' is not a device spec", "HOST:PORT")),
                          ("tcp:nowhere", ("expected tcp:HOST:PORT",)),
                          ("pool:rack", ("tune measures on one device",)),
                          ("R58M123", ("unknown device serial 'R58M123'", "edgequant devices"))]:
        res = run_cli("tune", "--device", spec, "--suite", str(full), env=env)
        assert res.returncode == 2, (spec, res.stderr)
        assert_one_line_error(res.stderr, *needles)
    res = run_cli("tune", "--suite", str(full), "--gate", "xml_parse_rate=>0.9", env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "xml_parse_rate=>0.9")
    assert not (tmp_path / "results.db").exists()  # refused before any run was started


@pytest.fixture(scope="module")
def tune_env(imatrix_tool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    env = cli_env(tmp, EDGEQUANT_CACHE_DIR=str(cache_dir()))
    profile = tmp / "t.toml"
    profile.write_text('[profile]\nname = "t"\n[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nwarmup = 0\n')
    return {"tmp": tmp, "env": env, "suite": write_suite(tmp / "suite"), "profile": profile}


def _tune_args(t, tiny_checkpoint, db, *gates) -> list[str]:
    args = ["tune", "--model", str(tiny_checkpoint), "--suite", str(t["suite"]), "--profile", str(t["profile"]),
            "--types", "Q8_0,Q4_K_M,Q2_K", "--variants", ",+imatrix", "--cache-dir", str(t["tmp"] / "cache"),
            "--db", str(db)]
    for g in gates:
        args += ["--gate", g]
    return args


def _tune(t, tiny_checkpoint, db, *gates):
    return run_cli(*_tune_args(t, tiny_checkpoint, db, *gates), env=t["env"])


@pytest.mark.slow
def test_tune_finds_the_smallest_passing_rung_and_stores_the_evidence(tune_env, tiny_checkpoint):
    db = tune_env["tmp"] / "pass.db"
    res = _tune(tune_env, tiny_checkpoint, db, "mean_kld<=1")
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(db, "SELECT run_id, status, status_detail FROM runs")
    assert run["status"] == "complete"
    statuses = {r["quant"]: r for r in db_rows(db, "SELECT quant, status, detail FROM rung_status WHERE run_id = ?",
                                              run["run_id"])}
    assert {"Q8_0", "Q8_0+imatrix", "Q4_K_M", "Q4_K_M+imatrix", "Q2_K", "Q2_K+imatrix"} <= set(statuses)
    rows = db_rows(db, "SELECT quant, metric, value, params FROM measurements WHERE run_id = ?", run["run_id"])
    kld = {r["quant"]: r["value"] for r in rows if r["metric"] == "mean_kld"}
    size = {r["quant"]: r["value"] for r in rows if r["metric"] == "size"}
    passing = [q for q, st in statuses.items() if st["status"] == "ok" and kld.get(q, 9) <= 1]
    assert passing
    tg = {r["quant"]: r["value"] for r in rows if r["metric"] == "tg_tps"}
    smallest = min(passing, key=lambda q: (size[q], -tg[q]))  # the smallest, then the fastest
    assert run["status_detail"] == f"tune chose {smallest}"
    assert f"chosen: {smallest}" in res.stdout
    # quality was judged on the evaluation half only
    from edgequant.profiles.suites import load_suite
    from edgequant.quantize.imatrix import split_suite

    split = split_suite(load_suite(tune_env["suite"]))
    ids = {r["case_id"] for r in db_rows(db, "SELECT case_id FROM eval_cases WHERE run_id = ?", run["run_id"])}
    assert ids == set(split.evaluation)
    # report sees it as an ordinary run
    rep = run_cli("report", run["run_id"], "--format", "json", "--db", str(db), env=tune_env["env"])
    assert rep.returncode == 0 and smallest in rep.stdout


@pytest.mark.slow
def test_tune_that_nothing_passes_names_the_closest_gate(tune_env, tiny_checkpoint):
    db = tune_env["tmp"] / "fail.db"
    res = _tune(tune_env, tiny_checkpoint, db, "mean_kld<0")
    assert res.returncode == 2
    line = assert_one_line_error(res.stderr, "no candidate passes every gate", "mean_kld < 0 at")
    rows = db_rows(db, "SELECT quant, metric, value FROM measurements WHERE metric = 'mean_kld'")
    closest = min((r for r in rows if r["quant"] != "BF16"), key=lambda r: r["value"])
    assert f"at {closest['quant']} " in line
    # every variant failed at Q8_0, so nothing below it was measured
    measured = {r["quant"] for r in rows}
    assert not measured & {"Q4_K_M", "Q4_K_M+imatrix", "Q2_K", "Q2_K+imatrix"}
    skipped = db_rows(db, "SELECT quant, detail FROM rung_status WHERE status = 'skipped'")
    assert {r["quant"] for r in skipped} == {"Q4_K_M", "Q4_K_M+imatrix", "Q2_K", "Q2_K+imatrix"}


@pytest.mark.slow
def test_an_interrupted_tune_is_partial_and_resume_finishes_it_measuring_nothing_twice(tune_env, tiny_checkpoint):
    db = tune_env["tmp"] / "resume.db"

    def measured() -> set[str]:
        if not db.exists():
            return set()
        try:
            return {r["quant"] for r in db_rows(db, "SELECT DISTINCT quant FROM measurements WHERE metric = 'tg_tps'")}
        except Exception:  # noqa: BLE001 - the database is being created
            return set()

    proc = start_cli(*_tune_args(tune_env, tiny_checkpoint, db, "mean_kld<=1"), env=tune_env["env"])
    wait_for(lambda: len(measured()) >= 2, 600, "the reference and one candidate measured", proc)
    _out, err = ctrl_c(proc, timeout=120)
    assert proc.returncode == 130
    (run,) = db_rows(db, "SELECT run_id, status, status_detail FROM runs")
    line = assert_one_line_error(err, "interrupted while tuning", run["run_id"], "edgequant tune --resume")
    assert run["status"] == "partial" and "interrupted" in run["status_detail"], line
    before = measured()

    # another command cannot resume it
    res = run_cli("run", "--resume", run["run_id"], "--db", str(db), env=tune_env["env"])
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "edgequant tune", "not `edgequant run`")

    res = run_cli("tune", "--resume", run["run_id"], "--db", str(db), env=tune_env["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    (after,) = db_rows(db, "SELECT run_id, status, status_detail FROM runs")
    assert after["status"] == "complete" and after["status_detail"].startswith("tune chose ")
    rows = db_rows(db, "SELECT quant, metric, value FROM measurements WHERE run_id = ?", run["run_id"])
    # what was measured before the interruption was not measured again: one speed row per rung
    tg_rows = [r["quant"] for r in rows if r["metric"] == "tg_tps"]
    assert sorted(tg_rows) == sorted(set(tg_rows)) and before <= set(tg_rows)
    kld_rows = [r["quant"] for r in rows if r["metric"] == "mean_kld"]
    assert sorted(kld_rows) == sorted(set(kld_rows))
    # and the choice follows from the stored figures as in a search that was never interrupted
    statuses = {r["quant"]: r["status"] for r in db_rows(db, "SELECT quant, status FROM rung_status WHERE run_id = ?",
                                                         run["run_id"])}
    kld = {r["quant"]: r["value"] for r in rows if r["metric"] == "mean_kld"}
    size = {r["quant"]: r["value"] for r in rows if r["metric"] == "size"}
    tg = {r["quant"]: r["value"] for r in rows if r["metric"] == "tg_tps"}
    passing = [q for q, st in statuses.items() if st == "ok" and kld.get(q, 9) <= 1]
    smallest = min(passing, key=lambda q: (size[q], -tg[q]))
    assert after["status_detail"] == f"tune chose {smallest}"


class FakePaired(Fake):
    """Measured with paired tables against the reference (for relative gates): quality q of n cases
    means round(q * n) cases right where the reference got all n right."""

    def __init__(self, quality: dict[str, float], n: int):
        super().__init__(quality)
        self.n = n

    def measure(self, spec, art):
        m = super().measure(spec, art)
        right = round(m.metrics["xml_parse_rate"] * self.n)
        m.paired = {"xml_parse_rate": [right, 0, self.n - right, 0]}
        return m


def test_relative_gates_pass_only_on_a_non_inferiority_pass():
    rel = [parse_gate("xml_parse_rate >= ref - 0.05")]
    # 1000 cases: identical answers PASS (the interval stays within 0.4 pp); 900/1000 is shown 10 pp worse
    fake = FakePaired({"Q8_0": 1, "Q6_K": 1, "Q5_K_M": 1, "Q4_K_M": 1, "Q3_K_M": 0.9, "Q2_K": 0.9}, n=1000)
    result = tune.search(tune.candidates(TYPES, ("",)), rel, fake.build, fake.measure)
    assert result.best.name == "Q4_K_M"
    by = {t.name: t for t in result.tried}
    assert by["Q3_K_M"].verdict == "fail" and by["Q3_K_M"].reasons[0].startswith(
        "xml_parse_rate >= ref - 0.05: FAIL (-10.0 pp)")
    # 25 cases: identical answers cannot be shown within 5 points (73 cases would tell): INCONCLUSIVE is
    # not a pass, so nothing passes and the closest gate is named
    small = FakePaired({t: 1 for t in TYPES}, n=25)
    result = tune.search(tune.candidates(TYPES, ("",)), rel, small.build, small.measure)
    assert result.best is None
    assert result.tried[0].reasons == ["xml_parse_rate >= ref - 0.05: INCONCLUSIVE (~73 cases would tell)"]
    assert "xml_parse_rate >= ref - 0.05" in tune.no_pass_message(result, rel)
