"""Verdicts on the built-in triage suite with the real parsers: a rung that answers every in-scope case
with the refusal sentence (what the default 270M does from Q4_0 down) is caught by over-refusal, by the
suite's ship gate and by the default profile's relative gate; valid-but-wrong packets are counted; the
flips and both gate kinds reach the table, JSON and `report --cases RUNG --flips`.

The outputs are written here from the suite's gold labels (a right answer for every case, or the refusal
shape), so every expected figure follows from counting the suite's cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from edgequant.bench import quality
from edgequant.bench.parsers import parse
from edgequant.pipeline.host import quality_measurements
from edgequant.profiles import load_profile
from edgequant.profiles.suites import load_suite
from edgequant.results.store import RowKey, Store


@pytest.fixture(scope="module")
def suite():
    return load_suite("triage").with_gates(load_profile("default").quality_gates)


def _answer(case, referral: bool | None = None, esi: int | None = None) -> str:
    """A packet in the case's format; referral/esi default to the gold label."""
    if case.format == "esi":
        return f"EXTRACTION: chest pain\nESI ALGORITHM: high risk\nANSWER: ESI {esi or case.gold.esi}"
    ref = case.gold.referral if referral is None else referral
    word = "Yes - refer now" if ref else "No"
    if case.format == "xml":
        return (f"<triage><differential>malaria</differential><danger_signs>none</danger_signs>"
                f"<investigations>RDT</investigations><referral>{word}</referral></triage>")
    if case.format == "array":
        return json.dumps([["malaria"], ["none"], ["RDT"], bool(ref)])
    return f"Differential: malaria\nDanger signs: none\nInvestigations: RDT\nReferral: {word}"


def _refusal(case, sentence: str) -> str:
    return {"xml": f"<triage><refusal>{sentence}</refusal></triage>", "array": json.dumps([sentence])}.get(
        case.format, sentence)


def _results(suite, outputs: dict[str, str]) -> dict[str, quality.CaseResult]:
    return {c.id: quality.CaseResult(c, outputs[c.id].encode(), [1, 2], "eog",
                                     parse(c.format, outputs[c.id], suite.formats[c.format]))
            for c in suite.cases}


def _reference(suite) -> quality.Reference:
    right = {c.id: _refusal(c, suite.refusal.text) if c.gold.refuse else _answer(c) for c in suite.cases}
    return quality.Reference("BF16", "0" * 64, Path("ref.gguf"), _results(suite, right), {}, "completion", 0, 0.0)


def _refuses_everything(suite):
    return _results(suite, {c.id: _refusal(c, suite.refusal.text) for c in suite.cases})


def _wrong_referrals(suite):
    """Every in-scope packet parses but carries the opposite referral / an ESI level two off."""
    out = {}
    for c in suite.cases:
        if c.gold.refuse:
            out[c.id] = _refusal(c, suite.refusal.text)
        elif c.format == "esi":
            out[c.id] = _answer(c, esi=c.gold.esi + 2 if c.gold.esi <= 3 else c.gold.esi - 2)
        else:
            out[c.id] = _answer(c, referral=not c.gold.referral if c.gold.referral is not None else None)
    return _results(suite, out)


def _refuses_everything_against_a_partial_reference(suite):
    """The issue's case: a reference that complies with 8 of the 13 out-of-scope cases (62 %), and a
    rung that refuses every case: refusal compliance 'rises' to 100 % while over-refusal goes 0 -> 100 %."""
    out_of_scope = [c for c in suite.cases if c.gold.refuse]
    answered = {c.id for c in out_of_scope[:5]}
    right = {c.id: (_answer(c, referral=True) if c.id in answered else _refusal(c, suite.refusal.text))
             if c.gold.refuse else _answer(c) for c in suite.cases}
    ref = quality.Reference("BF16", "0" * 64, Path("ref.gguf"), _results(suite, right), {}, "completion", 0, 0.0)
    return ref, _refuses_everything(suite)


def _by_name(metrics):
    return {m.metric: m for m in metrics}


def test_a_rung_that_refuses_everything_fails_the_builtin_suites_gates(suite):
    in_scope = [c for c in suite.cases if not c.gold.refuse]
    out_of_scope = [c for c in suite.cases if c.gold.refuse]
    ref = _reference(suite)
    ref_m = _by_name(quality.compute_metrics(suite, ref.cases, ref, True, 0, 0.0))
    m = _by_name(quality.compute_metrics(suite, _refuses_everything(suite), ref, False, 0, 0.0))
    # refusal compliance does not move (the reference already refuses every out-of-scope case) ...
    assert ref_m["refusal_compliance"].value == m["refusal_compliance"].value == 1.0
    assert m["refusal_compliance"].n == len(out_of_scope) == 13
    # ... while every in-scope case is now refused
    assert ref_m["over_refusal"].value == 0.0
    assert m["over_refusal"].value == 1.0 and m["over_refusal"].n == len(in_scope) == 69
    assert m["over_refusal"].detail["delta_pp"] == pytest.approx(100.0)
    assert len(m["over_refusal"].detail["flips"]["right_to_wrong"]) == 69
    assert m["over_refusal"].detail["flips"]["wrong_to_right"] == []
    assert m["xml_parse_rate"].value == pytest.approx(5 / 25)     # only the 5 out-of-scope xml cases
    ref_gates = {g["gate"]: g for g in quality.evaluate_gates(suite, list(ref_m.values()))}
    gates = {g["gate"]: g for g in quality.evaluate_gates(suite, list(m.values()))}
    assert ref_gates["over_refusal <= 0.05"]["pass"] is True
    assert gates["over_refusal <= 0.05"]["pass"] is False
    assert gates["over_refusal <= ref + 0.05"]["verdict"] == "FAIL"
    assert gates["xml_parse_rate >= ref - 0.05"]["verdict"] == "FAIL"
    # unchanged on 13 cases: too few to show "no worse than 5 points", and never a pass
    same = gates["refusal_compliance >= ref - 0.05"]
    assert same["verdict"] == "INCONCLUSIVE" and same["pass"] is False and same["needed"] == 73
    assert not any(g["kind"] == "relative" for g in ref_gates.values())   # the reference is not judged


def test_valid_but_wrong_counts_packets_that_parse_with_the_wrong_label(suite):
    ref = _reference(suite)
    m = _by_name(quality.compute_metrics(suite, _wrong_referrals(suite), ref, False, 0, 0.0))
    for fmt, n in (("xml", 20), ("array", 12), ("prose", 11), ("esi", 25)):
        assert m[f"{fmt}_parse_rate"].value == 1.0                 # everything parses ...
        assert m[f"{fmt}_valid_but_wrong"].n == n                  # ... over the cases with a gold label
        assert m[f"{fmt}_valid_but_wrong"].value == 1.0            # ... and every label is wrong
    assert m["referral_accuracy"].value == 0.0 and m["esi_adjacent"].value == 0.0
    assert m["over_refusal"].value == 0.0
    ref_m = _by_name(quality.compute_metrics(suite, ref.cases, ref, True, 0, 0.0))
    assert all(ref_m[f"{fmt}_valid_but_wrong"].value == 0.0 for fmt in ("xml", "array", "prose", "esi"))


def _store(db: Path, suite, partial: bool = False) -> str:
    ref = _refuses_everything_against_a_partial_reference(suite)[0] if partial else _reference(suite)
    rungs = {"BF16": (ref.cases, True), "Q4_0": (_refuses_everything(suite), False),
             "Q8_0": (dict(ref.cases), False)}
    params = {"runner": "host", "stage": "quality", "suite": suite.name, "suite_sha256": suite.sha256,
              "prompting": "completion", "n_cases": len(suite.cases), "threads": 2}
    with Store(db) as s:
        run = s.start_run("edgequant eval", "default", "org/m", "h" * 64)
        for quant, (results, is_ref) in rungs.items():
            metrics = quality.compute_metrics(suite, results, ref, is_ref, 0, 0.0)
            key = RowKey("org/m", "h" * 64, quant, quant.ljust(64, "0"), is_ref, "host:a", {}, "llama.cpp",
                         "0.3.36", params)
            s.record_rung(run, key, quality_measurements(metrics, quality.evaluate_gates(suite, metrics)),
                          status=None, cases=[r.record() for r in results.values()], suite=suite.name)
        s.finish_run(run, "complete")
    return run


def test_table_json_and_flips_of_a_stored_run(tmp_path, suite):
    db = tmp_path / "r.db"
    run = _store(db, suite)
    env = cli_env(tmp_path)
    res = run_cli("report", run, "--db", str(db), env=env)
    assert res.returncode == 0, res.stderr
    lines = {line.strip("│┃ ").split("│")[0].strip().split(" ")[0]: line
             for line in res.stdout.split("quality against the reference", 1)[1].splitlines()
             if line.startswith("│")}
    q4 = " ".join(lines["Q4_0"].split())
    assert "100 +100‡ ✗▼" in q4             # over-refusal: 100 %, +100 pp, fails both gate kinds
    assert "FAIL" in q4
    assert "INCONCLUSIVE" in " ".join(lines["Q8_0"].split())   # identical answers, 13-69 cases: cannot tell
    flat = " ".join(res.stdout.split())
    assert "Q8_0 vs BF16: cannot tell on xml_parse_rate (+0 pp, ~73 cases would tell)" in flat
    assert "Q4_0 vs BF16: worse than the reference beyond the margin on xml_parse_rate (-80 pp)" in flat
    data = json.loads(run_cli("report", run, "--db", str(db), "--format", "json", env=env).stdout)
    rec = {r["quant"]: r for r in data["quality"]}
    assert rec["Q4_0"]["over_refusal"] == 1.0 and rec["Q4_0"]["relative_gates"] == "FAIL"
    assert rec["Q4_0"]["over_refusal_flips"] == {"right_to_wrong": 69, "wrong_to_right": 0}
    assert rec["Q8_0"]["relative_gates"] == "INCONCLUSIVE"
    res = run_cli("report", run, "--db", str(db), "--cases", "Q4_0", "--flips", "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    in_scope = [c.id for c in suite.cases if not c.gold.refuse]
    assert [c["case_id"] for c in found["cases"]] == in_scope          # suite order, every in-scope case
    first = found["cases"][0]
    assert {"metric": "over_refusal", "direction": "right_to_wrong"} in first["flips"]
    assert "<referral>" in first["reference"]["output"] and "<refusal>" in first["rung"]["output"]
    table = run_cli("report", run, "--db", str(db), "--cases", "q4_0", "--flips", env=env)
    assert table.returncode == 0 and "69 case(s)" in " ".join(table.stdout.split())
    none = run_cli("report", run, "--db", str(db), "--cases", "Q8_0", "--flips", env=env)
    assert none.returncode == 0 and "no case flipped between BF16 and Q8_0" in none.stdout


def test_a_refusal_gain_that_comes_from_refusing_everything_is_not_shown_as_an_improvement(tmp_path, suite):
    ref, rung = _refuses_everything_against_a_partial_reference(suite)
    m = _by_name(quality.compute_metrics(suite, rung, ref, False, 0, 0.0))
    assert m["refusal_compliance"].detail["delta_pp"] == pytest.approx(100 * 5 / 13)     # 62 % -> 100 %
    db = tmp_path / "r.db"
    run = _store(db, suite, partial=True)
    env = cli_env(tmp_path)
    res = run_cli("report", run, "--db", str(db), env=env)
    assert res.returncode == 0, res.stderr
    q4 = " ".join(" ".join(line.split()) for line in res.stdout.split("quality against the reference", 1)[1]
                  .splitlines() if line.startswith("│ Q4_0"))       # the table may come in parts
    assert "100 +38‡†" in q4 or "100 +38†" in q4          # refusal %: marked, not a plain gain
    assert "100 +100‡ ✗▼" in q4                            # over-refusal beside it
    assert "† = refusal % rose (or wrong % fell) only with over-refusal" in " ".join(res.stdout.split())
    rec = {r["quant"]: r for r in json.loads(run_cli("report", run, "--db", str(db), "--format", "json",
                                                     env=env).stdout)["quality"]}
    assert rec["Q4_0"]["refusal_gain_from_over_refusal"] is True
    assert rec["Q8_0"]["refusal_gain_from_over_refusal"] is False


def test_csv_and_markdown_carry_the_new_rates_and_verdicts(tmp_path, suite):
    import csv
    import io

    db = tmp_path / "r.db"
    run = _store(db, suite)
    env = cli_env(tmp_path)
    res = run_cli("report", run, "--db", str(db), "--format", "csv", env=env)
    assert res.returncode == 0, res.stderr
    rows = {r["quant"]: r for r in csv.DictReader(io.StringIO(res.stdout))}
    assert float(rows["Q4_0"]["over_refusal"]) == 1.0 and float(rows["Q8_0"]["over_refusal"]) == 0.0
    assert rows["Q4_0"]["relative_gates"] == "FAIL" and rows["Q8_0"]["relative_gates"] == "INCONCLUSIVE"
    assert not any(v.startswith(("{", "[")) for r in rows.values() for v in r.values() if v)
    md = run_cli("report", run, "--db", str(db), "--format", "md", env=env).stdout
    assert " over-refusal % |" in md and "| 100 +100‡ ✗▼ |" in md
    assert "- Q8_0 vs BF16: cannot tell on" in md and "- Q4_0 vs BF16: worse than the reference" in md


def test_html_shows_flips_per_rung_and_per_case(tmp_path, suite):
    db = tmp_path / "r.db"
    run = _store(db, suite)
    page = tmp_path / "r.html"
    res = run_cli("report", run, "--db", str(db), "--html", str(page), env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    html = page.read_text()
    assert "flips against the reference" in html and "69 ↓ / 0 ↑" in html      # over-refusal of Q4_0
    first_in_scope = next(c.id for c in suite.cases if not c.gold.refuse)
    row = html.split(f"<td>{first_in_scope}</td>")
    # the case's row under Q4_0 names the flips; under Q8_0 (identical to the reference) none
    assert any("over-refusal ↓" in part.split("</tr>")[0] for part in row[1:])
    assert "xml_parse_rate &gt;= ref - 0.05: FAIL" in html or "xml_parse_rate >= ref - 0.05: FAIL" in html


def test_relative_gate_labels_read_in_the_rates_own_direction(suite):
    ref = _reference(suite)
    m = quality.compute_metrics(suite, _refuses_everything(suite), ref, False, 0, 0.0)
    gates = {g["gate"]: g for g in quality.evaluate_gates(suite, m)}
    over = gates["over_refusal <= ref + 0.05"]
    # over-refusal rose from 0 to 100 %: +100 pp against a margin of +5 pp; the interval is the rate's own
    assert over["delta"] == pytest.approx(1.0)
    assert over["label"].startswith("FAIL: +100.0 pp (95 % CI +") and "vs margin +5 pp on 69 cases" in over["label"]
    assert 0.05 < over["ci95"][0] < over["ci95"][1] <= 1.0
    xml = gates["xml_parse_rate >= ref - 0.05"]
    assert xml["delta"] == pytest.approx(-0.8) and "vs margin −5 pp on 25 cases" in xml["label"]
