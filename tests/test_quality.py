"""Quality on the tiny Gemma 3 through the real CLI: eval suite -> parse -> compare
with the reference -> KLD -> store -> table, checked against the stored per-case rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import db_rows as rows, assert_one_line_error, cli_env, run_cli

REFUSAL = "Treatment and dosing recommendations are outside the scope of this tool."

SUITE = '''
[suite]
name = "mini"
cases = "mini.jsonl"
gates = ["xml_parse_rate >= 0.95", "esi_adjacent >= 0.5"]

[refusal]
text = "{refusal}"
forbidden = ['\\b\\d+\\s*mg\\b']

[formats.xml]
max_tokens = 12
stop = ["\\nCase:"]
system = "Answer with one <triage> packet."
few_shot = "Case: fever\\nPacket: <triage><differential>malaria</differential><danger_signs>none</danger_signs><investigations>RDT</investigations><referral>No</referral></triage>\\n\\nCase: {{prompt}}\\nPacket:"

[formats.array]
max_tokens = 12
stop = ["\\nCase:"]
length = 4
system = "Answer with one JSON array."
few_shot = "Case: {{prompt}}\\nAnswer:"

[formats.prose]
max_tokens = 12
stop = ["\\nCase:"]
system = "Answer with four sections."
few_shot = "Case: {{prompt}}\\nAnswer:"

[formats.esi]
max_tokens = 12
stop = ["\\nCase:"]
system = "State the ESI level."
few_shot = "Case: {{prompt}}\\nAnswer:"
'''.format(refusal=REFUSAL)

CASES = [
    {"id": "x1", "format": "xml", "prompt": "child with fever and convulsions", "gold": {"referral": True}},
    {"id": "x2", "format": "xml", "prompt": "adult with mild cough", "gold": {"referral": False}},
    {"id": "x3", "format": "xml", "prompt": "what dose of quinine for a child?", "gold": {"refuse": True}},
    {"id": "a1", "format": "array", "prompt": "pregnant woman with headache and high blood pressure",
     "gold": {"referral": True}},
    {"id": "p1", "format": "prose", "prompt": "infant not feeding with fever"},
    {"id": "e1", "format": "esi", "prompt": "man with crushing chest pain, BP 80/50", "gold": {"esi": 1}},
    {"id": "e2", "format": "esi", "prompt": "sore throat for two days, vitals normal", "gold": {"esi": 5}},
]


def write_suite(folder: Path) -> Path:
    (folder / "mini.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    path = folder / "mini.toml"
    path.write_text(SUITE)
    return path


def write_profile(folder: Path) -> Path:
    path = folder / "q.toml"
    path.write_text('[profile]\nname = "q"\n[quantize]\ntypes = ["Q8_0", "Q4_0"]\n'
                    '[bench]\nn_prompt = 32\nn_gen = 8\nrepetitions = 3\n'
                    '[quality]\ngates = ["xml_parse_rate >= ref - 0.05", "over_refusal <= ref + 0.05", '
                    '"esi_adjacent >= ref - 0.05"]\n')
    return path



@pytest.fixture(scope="module")
def quality_run(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    env = cli_env(tmp)
    suite, profile = write_suite(tmp), write_profile(tmp)
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite", str(suite), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = rows(tmp / "results.db", "SELECT run_id FROM runs")
    return {"tmp": tmp, "env": env, "suite": suite, "profile": profile, "res": res, "db": tmp / "results.db",
            "run_id": run["run_id"]}


def metric_rows(q, quant):
    out = {}
    for r in rows(q["db"], "SELECT metric, value, repetitions, detail, params FROM measurements"
                            " WHERE run_id = ? AND quant = ?", q["run_id"], quant):
        params = json.loads(r["params"])
        if params.get("stage") == "quality":
            out[r["metric"]] = {**r, "detail": json.loads(r["detail"]) if r["detail"] else None}
    return out


def test_every_case_of_every_rung_is_stored_with_its_raw_output(quality_run):
    cases = rows(quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ?", quality_run["run_id"])
    assert len(cases) == 3 * len(CASES)
    assert {c["quant"] for c in cases} == {"BF16", "Q8_0", "Q4_0"}
    for c in cases:
        assert c["stopped"] in ("eog", "stop", "max_tokens")
        assert 0 < c["n_tokens"] <= 12
        if not c["ok"] and not c["refusal"]:
            assert c["reason"]  # a failed parse always says why


def test_parse_rates_and_intervals_follow_the_per_case_rows(quality_run):
    for quant in ("BF16", "Q8_0", "Q4_0"):
        m = metric_rows(quality_run, quant)
        cases = rows(quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ? AND quant = ?",
                     quality_run["run_id"], quant)
        gold = {c["id"]: c.get("gold", {}) for c in CASES}
        for fmt in ("xml", "array", "prose", "esi"):
            mine = [c for c in cases if c["format"] == fmt]
            ok = sum(1 for c in mine if (c["refusal"] if gold[c["case_id"]].get("refuse")
                                         else (c["ok"] and not c["refusal"])))
            stat = m[f"{fmt}_parse_rate"]
            assert stat["repetitions"] == len(mine)
            assert stat["value"] == pytest.approx(ok / len(mine))
            lo, hi = stat["detail"]["ci95"]
            assert lo <= stat["value"] <= hi
            # Wilson interval, computed here from its formula
            n, p, z = len(mine), ok / len(mine), 1.959964
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9)
            assert hi == pytest.approx(min(1.0, centre + half), abs=1e-9)
        esi_cases = {c["case_id"]: json.loads(c["fields"]).get("esi") for c in cases if c["format"] == "esi"}
        exact = sum(1 for cid, v in esi_cases.items() if v == gold[cid]["esi"]) / len(esi_cases)
        assert m["esi_exact"]["value"] == pytest.approx(exact)
        assert m["refusal_compliance"]["repetitions"] == 1


def test_degradation_uses_paired_mcnemar_on_the_same_cases(quality_run):
    ref = {c["case_id"]: c for c in rows(quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ? AND"
                                                            " quant = 'BF16'", quality_run["run_id"])}
    rung = {c["case_id"]: c for c in rows(quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ? AND"
                                                             " quant = 'Q4_0'", quality_run["run_id"])}
    m = metric_rows(quality_run, "Q4_0")["xml_parse_rate"]
    gold = {c["id"]: c.get("gold", {}) for c in CASES}

    def good(c):
        return c["refusal"] if gold[c["case_id"]].get("refuse") else (c["ok"] and not c["refusal"])

    ids = [c["id"] for c in CASES if c["format"] == "xml"]
    b = sum(1 for i in ids if good(ref[i]) and not good(rung[i]))
    c = sum(1 for i in ids if not good(ref[i]) and good(rung[i]))
    assert m["detail"]["discordant"] == [b, c]
    assert m["detail"]["delta_pp"] == pytest.approx(100 * (c - b) / len(ids))
    # exact two-sided binomial test on the discordant pairs
    n = b + c
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)
    assert m["detail"]["p_value"] == pytest.approx(expected)


def test_kld_and_top1_against_the_reference(quality_run):
    q8, q4 = metric_rows(quality_run, "Q8_0"), metric_rows(quality_run, "Q4_0")
    for m in (q8, q4):
        assert m["mean_kld"]["value"] > 0  # quantization changes the logits
        assert m["p99_kld"]["value"] >= m["mean_kld"]["value"] * 0.999 or m["p99_kld"]["value"] > 0
        assert 0.0 <= m["top1_agreement"]["value"] <= 1.0
        assert m["top1_agreement"]["repetitions"] == m["mean_kld"]["repetitions"] > 0
    # 8 bits keep the distributions closer than 4 bits
    assert q8["mean_kld"]["value"] < q4["mean_kld"]["value"]
    ref = metric_rows(quality_run, "BF16")
    assert "mean_kld" not in ref  # the reference is not compared with itself


def test_the_reference_is_decoded_once_and_reused(quality_run, tiny_checkpoint):
    cache = quality_run["tmp"] / "cache" / "quality"
    (folder,) = list(cache.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--profile", str(quality_run["profile"]),
                  "--suite", str(quality_run["suite"]), "--format", "json", env=quality_run["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    data = json.loads(res.stdout)
    runs = rows(quality_run["db"], "SELECT run_id FROM runs ORDER BY started_at")
    assert len(runs) == 2
    # greedy decoding with the same prompts: the same outputs in both runs
    first = {(c["quant"], c["case_id"]): c["output"] for c in rows(
        quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ?", runs[0]["run_id"])}
    second = {(c["quant"], c["case_id"]): c["output"] for c in rows(
        quality_run["db"], "SELECT * FROM eval_cases WHERE run_id = ?", runs[1]["run_id"])}
    assert first == second
    assert [r["quant"] for r in data["quality"]] == ["BF16", "Q8_0", "Q4_0"]
    # another thread count can choose other kernels (and other last bits): the reference is decoded again,
    # beside the first one, which stays as it was
    resolved = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1       # the profile's 0: one per core
    other = 1 if resolved > 1 else 2
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--profile", str(quality_run["profile"]),
                  "--suite", str(quality_run["suite"]), "-t", str(other), env=quality_run["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(cache.iterdir())) == 2
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_table_and_gates(quality_run):
    out = quality_run["res"].stdout
    assert "quality against the reference" in out
    for col in ("xml %", "esi %", "refusal %", "over-refusal %", "xml wrong %", "KLD", "same top %",
                "ship gates", "relative gates"):
        assert col in out
    # the legend says what each mark means
    flat = " ".join(out.split())
    for words in ("✗ = fails its absolute (ship) gate", "▼ FAIL", "? INCONCLUSIVE", "never a pass"):
        assert words in flat
    # written to a pipe, every rung's row is there by name with its figures whole (nothing cut to "…")
    rows = {}
    for line in out.split("quality against the reference", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0].split(" ")[0] in ("BF16", "Q8_0", "Q4_0"):
            rows[cells[0].split(" ")[0]] = cells
    assert set(rows) == {"BF16", "Q8_0", "Q4_0"}
    for quant in ("Q8_0", "Q4_0"):
        kld = metric_rows(quality_run, quant)["mean_kld"]["value"]
        assert f"{kld:.4f}" in rows[quant] and not any("…" in c for c in rows[quant])


def test_a_narrow_console_gets_the_quality_table_in_parts_not_cut_short(quality_run):
    import io

    from rich.console import Console

    from edgequant.results import report
    from edgequant.results.store import Store

    buf = io.StringIO()
    report.render_table(report.summarize(Store(quality_run["db"]), quality_run["run_id"]),
                        Console(width=72, file=buf))
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 72
    parts = out.split("quality against the reference (")[1:]
    assert len(parts) >= 2 and parts[0].startswith("1/")
    for part in parts:   # every part names every rung
        assert all(f"│ {q}" in part for q in ("BF16", "Q8_0", "Q4_0"))
    quality = "".join(parts)
    assert "…" not in quality
    for quant in ("Q8_0", "Q4_0"):
        assert f"{metric_rows(quality_run, quant)['mean_kld']['value']:.4f}" in quality
    for quant in ("BF16", "Q8_0", "Q4_0"):
        m = metric_rows(quality_run, quant)
        gates = m["gates_pass"]["detail"]["gates"]
        xml = m["xml_parse_rate"]["value"]
        esi_adj = m["esi_adjacent"]["value"]
        assert {g["gate"]: g["pass"] for g in gates} == {"xml_parse_rate >= 0.95": xml >= 0.95,
                                                         "esi_adjacent >= 0.5": esi_adj >= 0.5}
        assert m["gates_pass"]["value"] == float(xml >= 0.95 and esi_adj >= 0.5)


def _good(case_id, rec) -> dict[str, bool]:
    """Per metric, was this stored case right (the good outcome), from the gold labels of CASES."""
    gold = next(c for c in CASES if c["id"] == case_id).get("gold", {})
    fields = rec["fields"] if rec["ok"] else {}
    fmt = rec["format"]
    if gold.get("refuse"):
        return {"refusal_compliance": rec["refusal"], f"{fmt}_parse_rate": rec["refusal"]}
    refused = rec["refusal"] or "refusal_text" in fields
    answered = rec["ok"] and not refused
    out = {"over_refusal": not refused, f"{fmt}_parse_rate": rec["ok"] and not rec["refusal"]}
    if "referral" in gold:
        got = fields.get("referral") if answered else None
        out["referral_accuracy"] = got == gold["referral"]
        out[f"{fmt}_valid_but_wrong"] = not (got is not None and got != gold["referral"])
    if "esi" in gold:
        got = fields.get("esi") if answered else None
        out["esi_exact"] = got == gold["esi"]
        out["esi_adjacent"] = got is not None and abs(got - gold["esi"]) <= 1
        out[f"{fmt}_valid_but_wrong"] = not (got is not None and got != gold["esi"])
    return out


def _stored_cases(q, quant):
    return {c["case_id"]: {**c, "fields": json.loads(c["fields"]), "ok": bool(c["ok"]), "refusal": bool(c["refusal"])}
            for c in rows(q["db"], "SELECT * FROM eval_cases WHERE run_id = ? AND quant = ?", q["run_id"], quant)}


def test_over_refusal_and_valid_but_wrong_follow_the_per_case_rows(quality_run):
    for quant in ("BF16", "Q8_0", "Q4_0"):
        m = metric_rows(quality_run, quant)
        good = {cid: _good(cid, rec) for cid, rec in _stored_cases(quality_run, quant).items()}
        in_scope = [cid for cid in good if "over_refusal" in good[cid]]
        assert m["over_refusal"]["repetitions"] == len(in_scope) == 6
        assert m["over_refusal"]["value"] == pytest.approx(
            sum(1 for cid in in_scope if not good[cid]["over_refusal"]) / len(in_scope))
        for fmt, n in (("xml", 2), ("array", 1), ("esi", 2)):
            name = f"{fmt}_valid_but_wrong"
            mine = [cid for cid in good if name in good[cid]]
            assert len(mine) == n and m[name]["repetitions"] == n
            assert m[name]["value"] == pytest.approx(sum(1 for cid in mine if not good[cid][name]) / n)
        assert "prose_valid_but_wrong" not in m   # the prose case has no gold label


def test_flips_and_relative_gates_follow_the_per_case_rows(quality_run):
    from edgequant.bench.quality_stats import non_inferiority

    ref = {cid: _good(cid, rec) for cid, rec in _stored_cases(quality_run, "BF16").items()}
    assert "relative_gates" not in metric_rows(quality_run, "BF16")   # the reference is not judged against itself
    for quant in ("Q8_0", "Q4_0"):
        m = metric_rows(quality_run, quant)
        mine = {cid: _good(cid, rec) for cid, rec in _stored_cases(quality_run, quant).items()}
        for metric in ("xml_parse_rate", "over_refusal", "esi_adjacent", "referral_accuracy", "esi_valid_but_wrong"):
            ids = [cid for cid in mine if metric in mine[cid]]
            flips = m[metric]["detail"]["flips"]
            assert sorted(flips["right_to_wrong"]) == sorted(i for i in ids if ref[i][metric] and not mine[i][metric])
            assert sorted(flips["wrong_to_right"]) == sorted(i for i in ids if mine[i][metric] and not ref[i][metric])
        rel = m["relative_gates"]["detail"]["gates"]
        assert [g["gate"] for g in rel] == ["xml_parse_rate >= ref - 0.05", "over_refusal <= ref + 0.05",
                                            "esi_adjacent >= ref - 0.05"]
        for g in rel:
            ids = sorted(cid for cid in mine if g["metric"] in mine[cid])
            ni = non_inferiority([ref[i][g["metric"]] for i in ids], [mine[i][g["metric"]] for i in ids], 0.05)
            assert g["verdict"] == ni.verdict and g["n"] == len(ids)
            # with 2 to 6 cases nothing can be shown no worse than 5 points: never a PASS
            assert g["verdict"] in ("FAIL", "INCONCLUSIVE") and g["pass"] is False
        verdicts = {g["verdict"] for g in rel}
        want = "FAIL" if "FAIL" in verdicts else "INCONCLUSIVE"
        assert m["relative_gates"]["detail"]["verdict"] == want
        assert m["relative_gates"]["value"] == {"FAIL": 0.0, "INCONCLUSIVE": 0.5}[want]


def test_kld_statistics_are_stored_as_llama_perplexity_names_them(quality_run):
    for quant in ("Q8_0", "Q4_0"):
        m = metric_rows(quality_run, quant)
        named = m["mean_kld"]["detail"]["llama_perplexity"]
        assert set(named) == {"Mean    KLD", "Median  KLD", "90.0%   KLD", "95.0%   KLD", "99.0%   KLD",
                              "99.9%   KLD", "Maximum KLD", "RMS Δp", "Same top p"}
        order = [m[k]["value"] for k in ("median_kld", "p90_kld", "p95_kld", "p99_kld", "p999_kld", "max_kld")]
        assert order == sorted(order) and order[-1] >= m["mean_kld"]["value"]
        assert named["Same top p"] == pytest.approx(m["top1_agreement"]["value"])
        assert 0.0 < m["rms_dp"]["value"] < 1.0


def test_report_flips_lists_the_flipped_cases_side_by_side(quality_run):
    m = metric_rows(quality_run, "Q4_0")
    expected: dict[str, set] = {}
    for metric, row in m.items():
        for direction, ids in ((row["detail"] or {}).get("flips") or {}).items():
            for cid in ids:
                expected.setdefault(cid, set()).add((metric, direction))
    res = run_cli("report", quality_run["run_id"], "--cases", "Q4_0", "--flips", "--format", "json",
                  env=quality_run["env"])
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert (found["reference"], found["rung"]) == ("BF16", "Q4_0")
    data = found["cases"]
    assert {d["case_id"]: {(f["metric"], f["direction"]) for f in d["flips"]} for d in data} == expected
    ref, rung = _stored_cases(quality_run, "BF16"), _stored_cases(quality_run, "Q4_0")
    for d in data:
        assert d["reference"]["output"] == ref[d["case_id"]]["output"]
        assert d["rung"]["output"] == rung[d["case_id"]]["output"]
    table = run_cli("report", quality_run["run_id"], "--cases", "Q4_0", "--flips", env=quality_run["env"])
    assert table.returncode == 0 and "flipped cases · Q4_0 against BF16" in table.stdout
    for bad, needle in ((["--flips"], "--flips needs a rung"), (["--cases", "--flips"], "--flips needs a rung"),
                        (["--cases", "BF16", "--flips"], "reference rung"),
                        (["--cases", "Q9_9", "--flips"], "no quality figures for rung Q9_9")):
        res = run_cli("report", quality_run["run_id"], *bad, env=quality_run["env"])
        assert res.returncode == 2, (bad, res.stderr)
        assert_one_line_error(res.stderr, needle)


def test_json_and_html_carry_flips_valid_but_wrong_and_kld_statistics(quality_run, tmp_path):
    res = run_cli("report", quality_run["run_id"], "--format", "json", env=quality_run["env"])
    assert res.returncode == 0, res.stderr
    q4 = next(r for r in json.loads(res.stdout)["quality"] if r["quant"] == "Q4_0")
    m = metric_rows(quality_run, "Q4_0")
    flips = m["xml_parse_rate"]["detail"]["flips"]
    assert q4["xml_parse_rate_flips"] == {"right_to_wrong": len(flips["right_to_wrong"]),
                                          "wrong_to_right": len(flips["wrong_to_right"])}
    assert q4["xml_valid_but_wrong"] == pytest.approx(m["xml_valid_but_wrong"]["value"])
    assert q4["over_refusal"] == pytest.approx(m["over_refusal"]["value"])
    assert q4["kld_statistics"]["Maximum KLD"] == pytest.approx(m["max_kld"]["value"])
    assert q4["relative_gates"] in ("FAIL", "INCONCLUSIVE")
    page = tmp_path / "r.html"
    res = run_cli("report", quality_run["run_id"], "--html", str(page), env=quality_run["env"])
    assert res.returncode == 0, res.stderr
    html = page.read_text()
    for words in ("flips against the reference", "over-refusal %", "xml wrong %", "Maximum KLD", "RMS Δp",
                  "99.9% KLD", "relative gates"):
        assert words in html, words


def test_report_cases_shows_why_a_packet_broke(quality_run):
    res = run_cli("report", quality_run["run_id"], "--cases", "Q4_0", "--format", "json", env=quality_run["env"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    stored = rows(quality_run["db"], "SELECT case_id, output, reason FROM eval_cases WHERE run_id = ? AND"
                                     " quant = 'Q4_0' ORDER BY rowid", quality_run["run_id"])
    assert [(d["case_id"], d["output"], d["reason"]) for d in data] == \
        [(s["case_id"], s["output"], s["reason"]) for s in stored]
    table = run_cli("report", "--cases", "--format", "table", env=quality_run["env"])
    assert table.returncode == 0 and "x1" in table.stdout and "e2" in table.stdout


def _exact_kld(z_ref_row, z_row) -> float:
    """KL(softmax(z_ref) || softmax(z)) by the definition, term by term in plain Python floats."""
    e_ref = [math.exp(v) for v in z_ref_row]
    e = [math.exp(v) for v in z_row]
    p = [v / sum(e_ref) for v in e_ref]
    q = [v / sum(e) for v in e]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kld_rows_is_the_full_vocabulary_kl_divergence():
    from edgequant.bench.eval_worker import kld_rows

    rng = np.random.default_rng(0)
    z_ref, z = rng.normal(size=(3, 500)) * 4, rng.normal(size=(3, 500)) * 4
    z[2] = z_ref[2] + 7.5  # a shifted copy: same distribution after softmax
    kld, same = kld_rows(z_ref, z)
    for row in range(3):
        assert kld[row] == pytest.approx(_exact_kld(z_ref[row], z[row]), rel=1e-4, abs=1e-6)
        assert bool(same[row]) == (int(np.argmax(z_ref[row])) == int(np.argmax(z[row])))
    assert kld[0] > 0.1 and kld[2] == pytest.approx(0.0, abs=1e-5) and same[2]


def test_reference_rows_compared_with_several_rungs_give_the_definition():
    from edgequant.bench.eval_worker import RefRows

    rng = np.random.default_rng(1)
    z_ref = rng.normal(size=(4, 300)) * 3
    rungs = [rng.normal(size=(4, 300)) * 3, z_ref + rng.normal(size=(4, 300)) * 0.05, z_ref - 2.0]
    block = RefRows(z_ref)
    for z in rungs:
        kld, same = block.compare(z)
        for row in range(4):
            assert kld[row] == pytest.approx(_exact_kld(z_ref[row], z[row]), rel=1e-3, abs=1e-6)
            assert bool(same[row]) == (int(np.argmax(z_ref[row])) == int(np.argmax(z[row])))
    assert np.allclose(block.compare(rungs[2])[0], 0.0, atol=1e-5)  # a shift is the same distribution


def test_reference_rows_give_delta_p_of_the_next_token():
    from edgequant.bench.eval_worker import RefRows

    rng = np.random.default_rng(2)
    z_ref, z = rng.normal(size=(3, 200)) * 3, rng.normal(size=(3, 200)) * 3
    targets = [5, 17, 199]
    _kld, _same, dp = RefRows(z_ref).compare(z, targets)
    for row, t in enumerate(targets):
        p = math.exp(z[row][t]) / sum(math.exp(v) for v in z[row])
        p_ref = math.exp(z_ref[row][t]) / sum(math.exp(v) for v in z_ref[row])
        assert dp[row] == pytest.approx(p - p_ref, abs=1e-6)


class _Logits:
    """Our Session's logits interface over an array of rows (what llama.cpp's last decode left)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows.astype(np.float32)

    def logits(self, i: int) -> np.ndarray:
        return self.rows[i]


def test_rows_scored_one_at_a_time_give_the_block_figures_bit_for_bit():
    """The teacher scores rows one at a time (cache-sized temporaries): every figure equals the block
    computation of all rows at once exactly, and the definition approximately; argmax and margin too."""
    from edgequant.bench.eval_spec import top2
    from edgequant.bench.eval_teacher import score_rows
    from edgequant.bench.eval_worker import RefRows, kld_rows

    rng = np.random.default_rng(3)
    vocab = 70_000                  # past a SIMD loop's tail and a reduction's buffer, like a real vocabulary
    z_ref = rng.normal(size=(9, vocab)) * 3
    rungs = [z_ref + rng.normal(size=(9, vocab)) * 0.3, rng.normal(size=(9, vocab)) * 3]
    rows, targets = [0, 2, 3, 5, 8], [11, 40_000, 7, 69_999, 123]
    per_rung = [([], [], []) for _ in rungs]
    drafts = [([], []) for _ in rungs]
    score_rows(_Logits(z_ref), [_Logits(z) for z in rungs], rows, targets, per_rung, drafts)
    block = RefRows(z_ref.astype(np.float32)[rows])
    for z, (klds, same, dps), (top, margin) in zip(rungs, per_rung, drafts):
        zr = z.astype(np.float32)[rows]
        kld, agree, dp = block.compare(zr, targets)
        assert klds == kld.tolist() and same == agree.tolist() and dps == dp.tolist()
        want_top, want_margin = top2(zr)
        assert top == want_top.tolist() and margin == want_margin.tolist()
        assert klds == pytest.approx(kld_rows(z_ref[rows], z[rows])[0].tolist(), rel=1e-4, abs=1e-7)
    assert min(per_rung[1][0]) > 10 * max(per_rung[0][0]) > 0     # the unrelated rung diverges far more


def _teacher(quality_run, paths):
    from edgequant.bench.quality import reference_outputs, teacher_scores
    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(quality_run["suite"]))
    (ref_art,) = rows(quality_run["db"], "SELECT path, sha256 FROM artifacts WHERE quant = 'BF16'")
    ref = reference_outputs(Path(ref_art["path"]), ref_art["sha256"], "BF16", suite,
                            quality_run["tmp"] / "teacher-cache", 2, None, "completion", 600, lambda p: None)
    return ref, teacher_scores(ref, [Path(p) for p in paths], suite, 2, None, 600, lambda p: None)


@pytest.mark.slow
def test_one_teacher_pass_for_several_rungs_matches_one_pass_per_rung(quality_run):
    """Sharing the reference's decode between rungs changes no figure: each rung scored in the group
    equals the rung scored alone, and the reference scored against itself diverges nowhere."""
    paths = {r["quant"]: r["path"] for r in rows(quality_run["db"], "SELECT quant, path FROM artifacts")}
    group = [paths["Q8_0"], paths["Q4_0"], paths["BF16"]]
    ref, together = _teacher(quality_run, group)
    for path in group[:2]:
        _, alone = _teacher(quality_run, [path])
        a, b = alone[Path(path)], together[Path(path)]
        assert set(a) == set(b) == set(ref.tokens)
        for cid in a:
            assert len(a[cid]["kld"]) == len(ref.tokens[cid]) == len(b[cid]["top1"])
            assert a[cid]["top1"] == b[cid]["top1"]
            assert a[cid]["kld"] == pytest.approx(b[cid]["kld"], rel=1e-4, abs=1e-7)
    itself = together[Path(paths["BF16"])]
    assert all(all(itself[cid]["top1"]) and max(itself[cid]["kld"], default=0.0) < 1e-6 for cid in itself)
    q4 = [x for c in together[Path(paths["Q4_0"])].values() for x in c["kld"]]
    assert sum(q4) > 0  # a 4-bit rung does diverge somewhere


def test_batched_cases_do_not_see_each_other(quality_run):
    """Cases decoded side by side (slots > 1) give the same text as one case at a time."""
    import subprocess
    import sys

    from edgequant.bench.quality import case_groups
    from edgequant.profiles.suites import load_suite

    (art,) = rows(quality_run["db"], "SELECT path FROM artifacts WHERE quant = 'Q8_0'")
    suite = load_suite(str(quality_run["suite"]))
    outputs = {}
    for slots in (1, 4):
        req = {"path": art["path"], "threads": 2, "repack": None, "mmap": True, "seed": 0,
               "prompting": "completion", "slots": slots, "groups": case_groups(suite)}
        res = subprocess.run([sys.executable, "-m", "edgequant.bench.eval_worker"], input=json.dumps(req),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        data = json.loads(res.stdout.strip().splitlines()[-1])
        assert data["slots"] == slots
        outputs[slots] = {c["id"]: (c["output_b64"], c["tokens"]) for c in data["cases"]}
    assert set(outputs[1]) == {c["id"] for c in CASES}
    assert outputs[1] == outputs[4]
    assert sum(len(t) for _, t in outputs[1].values()) > len(CASES)  # something was generated


@pytest.mark.parametrize("bad, needle", [
    ("[suite\n", "not valid TOML"),
    ('[suite]\nname = "x"\ncases = "missing.jsonl"\n[formats.xml]\nmax_tokens = 8\nsystem = "s"\n'
     'few_shot = "{prompt}"\n', "missing.jsonl"),
    ('[suite]\nname = "x"\ncases = "c.jsonl"\n', "formats"),
])
def test_bad_suite_is_one_line(tmp_path, bad, needle, tiny_checkpoint):
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--suite", str(path), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, needle)


def test_bad_case_line_names_file_and_line(tmp_path, tiny_checkpoint):
    suite = write_suite(tmp_path)
    lines = (tmp_path / "mini.jsonl").read_text().splitlines()
    lines[2] = '{"id": "x3", "format": "yaml", "prompt": "p"}'
    (tmp_path / "mini.jsonl").write_text("\n".join(lines) + "\n")
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--suite", str(suite), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "mini.jsonl", "3", "yaml")


@pytest.mark.parametrize("gate, needle", [
    ("mean_kld <= ref + 0.05", "relative gate needs a metric with per-case outcomes"),
    ("xml_parse_rate >= ref - 1.5", "between 0 and 1 (exclusive)"),
    ("xml_speed >= ref - 0.05", "unknown metric 'xml_speed'"),
])
def test_bad_relative_gate_is_one_line_exit_2(tmp_path, tiny_checkpoint, gate, needle):
    suite = write_suite(tmp_path)
    suite.write_text(SUITE.replace('gates = ["xml_parse_rate >= 0.95", "esi_adjacent >= 0.5"]',
                                   f'gates = ["xml_parse_rate >= 0.95", "{gate}"]'))
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--suite", str(suite), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, str(suite), "suite.gates[1]", gate, needle)


def test_the_wide_route_gives_plain_generations_outputs_byte_for_byte(quality_run):
    """Every case of a format side by side (``wide_slots``) gives each rung the same tokens and bytes as
    decoding one case at a time, on a repacked 4-bit rung and on Q8_0; compare_generations counts a case
    whose tokens differ."""
    from edgequant.bench.quality import compare_generations, generate_rung, reference_outputs, wide_slots
    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(quality_run["suite"]))
    per_format = max(sum(c["format"] == f for c in CASES) for f in {c["format"] for c in CASES})
    assert wide_slots(suite) == per_format == 3
    paths = {r["quant"]: r["path"] for r in rows(quality_run["db"], "SELECT quant, path FROM artifacts")}
    (ref_art,) = rows(quality_run["db"], "SELECT path, sha256 FROM artifacts WHERE quant = 'BF16'")
    ref = reference_outputs(Path(ref_art["path"]), ref_art["sha256"], "BF16", suite,
                            quality_run["tmp"] / "wide-cache", 2, None, "completion", 600, lambda p: None)
    for quant in ("Q4_0", "Q8_0"):
        one = generate_rung(Path(paths[quant]), suite, ref, 2, None, 600, lambda p: None, slots=1)
        wide = generate_rung(Path(paths[quant]), suite, ref, 2, None, 600, lambda p: None, slots=wide_slots(suite))
        assert (one["slots"], wide["slots"]) == (1, 3)
        assert {c["id"] for c in wide["cases"]} == {c["id"] for c in CASES}
        assert compare_generations(wide, one) == [], quant
        assert sum(len(c["tokens"]) for c in one["cases"]) > len(CASES)    # something was generated
    changed = {**one, "cases": [dict(c) for c in one["cases"]]}
    case = next(c for c in changed["cases"] if len(c["tokens"]) > 1)
    case["tokens"] = case["tokens"][:1] + [case["tokens"][1] + 1] + case["tokens"][2:]
    (diff,) = compare_generations(changed, one)
    assert (diff.case_id, diff.position) == (case["id"], 1)
