"""`edgequant tag` and `edgequant compare`: pairing, only the differing columns, the regression gates,
exit codes and the JUnit / Markdown / JSON outputs.  Runs are stored with the real store (SQLite, and
PostgreSQL for one end-to-end check); the expected verdicts follow from the figures written here."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

from conftest import assert_one_line_error, cli_env, run_cli
from edgequant.results.store import Measurement, RowKey, Store

MiB = 1024 * 1024
BENCH = {"runner": "host", "threads": 2, "n_prompt": 512, "n_gen": 128, "repetitions": 3, "warmup": 1}
BASE_FIGS = {"size": (300 * MiB, None, "bytes"), "bpw": (4.5, None, "bits/weight"),
             "pp_tps": (200.0, 4.0, "t/s"), "tg_tps": (50.0, 1.0, "t/s"),
             "peak_rss": (1000 * MiB, None, "bytes"), "peak_rss_anon": (100 * MiB, None, "bytes")}


def store_run(db, rungs, *, params=None, statuses=None, quality=None, status="complete", model="org/m") -> str:
    """rungs: {(quant, device): {metric: (value, sd, unit)}}; quality: {(quant, device): (figs, cases, suite)}."""
    with Store(db) as s:
        run = s.start_run("edgequant run", "default", model, "h" * 64)
        for (quant, device), figs in rungs.items():
            key = RowKey(model, "h" * 64 if model == "org/m" else "g" * 64, quant, quant * 4, quant == "BF16",
                         device, {"cpu_model": device}, "llama.cpp", "0.3.36", params or BENCH)
            st = (statuses or {}).get((quant, device), "ok")
            s.record_rung(run, key, [Measurement(m, v, u, sd, 3 if sd is not None else None)
                                     for m, (v, sd, u) in figs.items()], status=st,
                          detail=None if st == "ok" else "killed by the kernel")
        for (quant, device), (figs, cases, suite) in (quality or {}).items():
            qparams = {"runner": "host", "stage": "quality", "suite": suite, "suite_sha256": "x", "threads": 2}
            key = RowKey(model, "h" * 64, quant, quant * 4, quant == "BF16", device, {}, "llama.cpp", "0.3.36",
                         qparams)
            s.record_rung(run, key, [Measurement(m, v, u, None, None, d) for m, (v, u, d) in figs.items()],
                          status=None, cases=cases, suite=suite)
        s.finish_run(run, status)
    return run


def figs(**changes):
    out = dict(BASE_FIGS)
    for k, v in changes.items():
        out[k] = v
    return out


def compare(tmp_path, *args, db=None):
    db = db or tmp_path / "r.db"
    return run_cli("compare", *args, "--db", str(db), env=cli_env(tmp_path), timeout=120)


def test_within_noise_and_small_changes_pass_and_only_differing_columns_show(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs()})
    # tg drops 12 % but the runs are noisy (sd 1 + 6 > 6); pp drops 2 % (under the percentage) beyond its noise
    b = store_run(db, {("Q4_0", "host:a"): figs(tg_tps=(44.0, 6.0, "t/s"), pp_tps=(196.0, 0.5, "t/s"))})
    r = compare(tmp_path, a, b, "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    assert "no regression" in r.stdout
    assert "tg_tps" in r.stdout and "pp_tps" in r.stdout and "50 → 44" in r.stdout and "-12.0 %" in r.stdout
    # unchanged figures and constant identity columns are left out
    for hidden in ("bpw", "peak_rss", "size", "device", "n_prompt"):
        assert hidden not in r.stdout.split("no regression")[0], hidden
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["regression"] is False
    speed = {g["gate"]: g["status"] for g in data["gates"]}
    assert speed == {"speed:pp_tps": "pass", "speed:tg_tps": "pass", "memory:peak_rss": "pass",
                     "memory:peak_rss_anon": "pass", "present": "pass"}


def test_speed_drop_beyond_percentage_and_noise_is_a_regression(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs(), ("Q8_0", "host:a"): figs()})
    b = store_run(db, {("Q4_0", "host:a"): figs(tg_tps=(40.0, 1.0, "t/s")), ("Q8_0", "host:a"): figs()})
    junit = tmp_path / "junit.xml"
    md = tmp_path / "summary.md"
    r = compare(tmp_path, a, b, "--junit", str(junit), "--markdown", str(md))
    assert r.returncode == 1, r.stderr
    line = assert_one_line_error(r.stderr, "1 regression", "Q4_0", "speed:tg_tps")
    assert "Q8_0" not in line
    root = ET.parse(junit).getroot()
    cases = root.findall("testcase")
    # Q4_0 and Q8_0 on one device: 2 speed + 2 memory + presence each
    assert len(cases) == 10 and root.get("failures") == "1"
    failed = [(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None]
    assert failed == [("org/m.Q4_0.host:a", "speed:tg_tps")]
    text = md.read_text()
    assert "| rung |" in text and "**Regressions**" in text and "speed:tg_tps" in text and "❌" in text


def test_memory_rise_needs_both_the_percentage_and_the_absolute_amount(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs()})
    # anon +50 % but only +50 MiB: not a regression; peak RSS +25 % and +250 MiB: a regression
    b = store_run(db, {("Q4_0", "host:a"): figs(peak_rss_anon=(150 * MiB, None, "bytes"),
                                                peak_rss=(1250 * MiB, None, "bytes"))})
    r = compare(tmp_path, a, b, "--json", str(tmp_path / "c.json"))
    assert r.returncode == 1
    gates = {g["gate"]: g["status"] for g in json.loads((tmp_path / "c.json").read_text())["gates"]}
    assert gates["memory:peak_rss"] == "fail" and gates["memory:peak_rss_anon"] == "pass"
    # a gates profile with a higher absolute limit lets it through
    loose = tmp_path / "loose.toml"
    loose.write_text('[gates]\nname = "loose"\n[memory]\nmax_rise_mib = 300\n')
    assert compare(tmp_path, a, b, "--gates", str(loose)).returncode == 0


def cases(n, failing, fmt="xml"):
    return [{"case_id": f"c{i:02d}", "format": fmt, "ok": i >= failing, "refusal": False,
             "reason": None if i >= failing else "no closing tag", "fields": {}, "output": "<x/>",
             "stopped": "eos", "n_tokens": 3} for i in range(n)]


def gates_fig(passed: bool, value: float):
    return (1.0 if passed else 0.0, "bool", {"gates": [{"gate": "xml_parse_rate >= 0.9", "metric": "xml_parse_rate",
                                                       "value": value, "pass": passed}]})


def test_quality_drop_significant_by_mcnemar_and_a_suite_gate_going_to_fail(tmp_path):
    db = tmp_path / "r.db"
    base_q = {("Q4_0", "host:a"): ({"xml_parse_rate": (1.0, "ratio", None), "gates_pass": gates_fig(True, 1.0)},
                                   cases(30, 0), "mysuite")}
    a = store_run(db, {("Q4_0", "host:a"): figs()}, quality=base_q)
    # 2 of 30 cases newly fail: b=2, c=0, p=0.5; -6.7 pp with a 95 % interval (Newcombe) of about -21.3 to
    # +5.7 pp: neither shown within the 5-point margin nor shown beyond it -> inconclusive (not a pass, not a
    # regression); the suite gate (>= 0.9) still passes
    small = {("Q4_0", "host:a"): ({"xml_parse_rate": (28 / 30, "ratio", None), "gates_pass": gates_fig(True, 0.93)},
                                  cases(30, 2), "mysuite")}
    b = store_run(db, {("Q4_0", "host:a"): figs()}, quality=small)
    r = compare(tmp_path, a, b, "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    g = {x["gate"]: x for x in json.loads((tmp_path / "b.json").read_text())["gates"]}
    assert g["quality:xml_parse_rate"]["status"] == "inconclusive"
    assert "b=2 c=0" in g["quality:xml_parse_rate"]["message"]
    assert "INCONCLUSIVE" in r.stdout and "1 inconclusive" in r.stdout
    # 7 of 30 fail: -23.3 pp, upper bound -23.3 + sqrt(0.114^2 + 0.115^2) = -7.1 pp, beyond the margin;
    # McNemar b=7, c=0, p=2/128 < 0.05; the suite gate goes PASS -> FAIL
    big = {("Q4_0", "host:a"): ({"xml_parse_rate": (23 / 30, "ratio", None), "gates_pass": gates_fig(False, 0.77)},
                                cases(30, 7), "mysuite")}
    c = store_run(db, {("Q4_0", "host:a"): figs()}, quality=big)
    r = compare(tmp_path, a, c, "--json", str(tmp_path / "c.json"))
    assert r.returncode == 1
    g = {x["gate"]: x for x in json.loads((tmp_path / "c.json").read_text())["gates"]}
    assert g["quality:xml_parse_rate"]["status"] == "fail"
    assert g["suite:xml_parse_rate >= 0.9"]["status"] == "fail"
    assert "PASS → FAIL" in g["suite:xml_parse_rate >= 0.9"]["message"]
    assert "100.0 % → 76.7 %" in r.stdout  # the quality column shows baseline → candidate
    # a candidate without the quality stage: the quality gates are skipped, visibly, not passed
    d = store_run(db, {("Q4_0", "host:a"): figs()})
    r = compare(tmp_path, a, d, "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0
    g = {x["gate"]: x for x in json.loads((tmp_path / "d.json").read_text())["gates"]}
    assert g["present:quality"]["status"] == "skip" and not any(k.startswith("quality:") for k in g)
    assert "quality not compared" in r.stdout


def test_quality_outcomes_use_the_suites_gold_labels(tmp_path):
    """With the built-in triage suite, answering a case that must be refused is a failure."""
    from edgequant.profiles.suites import load_suite
    from edgequant.results.compare import case_outcomes

    suite = load_suite("triage")
    refuse = [c for c in suite.cases if c.gold.refuse]
    rec = {c.id: {"case_id": c.id, "format": c.format, "ok": True, "refusal": False, "fields": {}} for c in refuse}
    out = case_outcomes(rec, suite)
    assert set(out["refusal_compliance"]) == {c.id for c in refuse}
    assert not any(out["refusal_compliance"].values())
    refused = {cid: {**r, "ok": False, "refusal": True} for cid, r in rec.items()}
    assert all(case_outcomes(refused, suite)["refusal_compliance"].values())
    # without the gold labels an answered refusal case just counts as parsed
    assert all(case_outcomes(rec, None)[f"{refuse[0].format}_parse_rate"].values())


def test_missing_rung_missing_device_and_a_failed_rung_are_regressions(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs(), ("Q8_0", "host:a"): figs(), ("Q2_K", "host:a"): figs(),
                       ("Q4_0", "phone:b"): figs()})
    b = store_run(db, {("Q4_0", "host:a"): figs(), ("Q2_K", "host:a"): {"size": BASE_FIGS["size"]}},
                  statuses={("Q2_K", "host:a"): "oom"})
    r = compare(tmp_path, a, b, "--json", str(tmp_path / "c.json"))
    assert r.returncode == 1
    present = {(x["quant"], x["device_id"]): (x["status"], x["message"])
               for x in json.loads((tmp_path / "c.json").read_text())["gates"] if x["gate"] == "present"}
    assert present[("Q4_0", "host:a")][0] == "pass"
    assert present[("Q8_0", "host:a")] == ("fail", "rung Q8_0 on host:a is missing in the candidate")
    assert present[("Q4_0", "phone:b")] == ("fail", "device phone:b is missing in the candidate")
    assert present[("Q2_K", "host:a")][0] == "fail" and "oom" in present[("Q2_K", "host:a")][1]


def test_no_comparable_rows_and_bad_input_exit_2(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs()})
    b = store_run(db, {("Q4_0", "host:a"): figs()}, params={**BENCH, "n_prompt": 256})
    r = compare(tmp_path, a, b)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "no comparable rows", "n_prompt 512 → 256")
    r = compare(tmp_path, a, "nope")
    assert r.returncode == 2 and "nope" in assert_one_line_error(r.stderr)
    bad = tmp_path / "bad.toml"
    bad.write_text("[gates]\n[speed]\nmax_drop_pct = 'ten'\n")
    r = compare(tmp_path, a, a, "--gates", str(bad))
    assert r.returncode == 2
    assert_one_line_error(r.stderr, str(bad), "speed.max_drop_pct")
    # different repetitions still pair (they change the precision, not the quantity)
    c = store_run(db, {("Q4_0", "host:a"): figs()}, params={**BENCH, "repetitions": 5})
    assert compare(tmp_path, a, c).returncode == 0


def test_tags_last_and_last_complete_through_the_cli(tmp_path):
    db = tmp_path / "r.db"
    env = cli_env(tmp_path)
    a = store_run(db, {("Q4_0", "host:a"): figs()})
    r = run_cli("tag", a, "good", "--db", str(db), env=env)
    assert r.returncode == 0 and f"tagged run {a} as good" in r.stdout
    listing = run_cli("report", "--list", "--db", str(db), env=env).stdout
    assert any(a in ln and "good" in ln for ln in listing.splitlines())
    store_run(db, {("Q4_0", "host:a"): figs(tg_tps=(30.0, 0.5, "t/s"))}, status="partial")
    # last is the partial run (a regression); last-complete is the tagged one
    assert compare(tmp_path, "good", "last").returncode == 1
    assert compare(tmp_path, "good", "last-complete").returncode == 0
    r = run_cli("tag", "missing", "good", "--db", str(db), env=env)
    assert r.returncode == 2 and "missing" in assert_one_line_error(r.stderr)


def test_compare_on_a_shared_postgresql_store(tmp_path, pg_url):
    a = store_run(pg_url, {("Q4_0", "host:a"): figs(), ("Q4_0", "phone:b"): figs()})
    b = store_run(pg_url, {("Q4_0", "host:a"): figs(), ("Q4_0", "phone:b"): figs(tg_tps=(25.0, 1.0, "t/s"))})
    env = cli_env(tmp_path)
    assert run_cli("tag", a, "good", "--db", pg_url, env=env).returncode == 0
    r = run_cli("compare", "good", b, "--db", pg_url, env=env)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "phone:b", "speed:tg_tps")
    assert "device" in r.stdout  # two devices: the device column is shown


def test_the_nightly_workflow_uses_real_commands_and_options():
    """docs/nightly.yml is valid YAML and every `edgequant ...` line in it names a real command and options."""
    import shlex

    import yaml

    from edgequant.cli import cli

    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "nightly.yml").read_text())
    steps = doc["jobs"]["farm"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    calls = [ln.strip() for ln in script.replace("\\\n", " ").splitlines() if ln.strip().startswith(("edgequant ",
                                                                                                      "if ! edgequant"))]
    used = set()
    for line in calls:
        words = shlex.split(line.removeprefix("if ! ").split(">")[0].split(";")[0])
        cmd = cli.commands[words[1]]
        used.add(words[1])
        known = {opt for p in cmd.params for opt in p.opts}
        for w in words[2:]:
            if w.startswith("-"):
                assert w in known, f"{line}: {w} is not an option of `edgequant {words[1]}`"
    assert {"run", "compare", "tag", "report", "export"} <= used


def test_quality_margin_is_validated(tmp_path):
    db = tmp_path / "r.db"
    a = store_run(db, {("Q4_0", "host:a"): figs()})
    for value in ("0", "1", "1.5", "'five'"):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[gates]\n[quality]\nmargin = {value}\n")
        r = compare(tmp_path, a, a, "--gates", str(bad))
        assert r.returncode == 2, value
        assert_one_line_error(r.stderr, str(bad), "quality.margin", "between 0 and 1")
