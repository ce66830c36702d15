"""Depths and KV cache types (issue 18) through the real CLI on the tiny Gemma 3: every rung measured in
each variant on one model load, stored as rungs of their own (``Q8_0@d24,kv=q8_0``), evaluated with a
quantized KV cache, shown in the table, JSON and HTML; bad depths refused with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli
from test_quality import CASES, write_suite

DEPTH = 24


def variant_profile(folder: Path, depths, cache_types=("f16", "q8_0"), name="v.toml") -> Path:
    path = folder / name
    path.write_text('[profile]\nname = "v"\n[quantize]\ntypes = ["Q8_0"]\n'
                    '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nwarmup = 0\n'
                    f"depths = {json.dumps(list(depths))}\ncache_types = {json.dumps(list(cache_types))}\n")
    return path


@pytest.fixture(scope="module")
def variant_run(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    env = cli_env(tmp)
    suite = write_suite(tmp)
    profile = variant_profile(tmp, [0, DEPTH, "suite"])
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite", str(suite), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(tmp / "results.db", "SELECT run_id FROM runs")
    return {"tmp": tmp, "env": env, "suite": suite, "res": res, "db": tmp / "results.db", "run_id": run["run_id"]}


def _suite_prefix_lengths(q) -> dict[str, int]:
    """Each format's prompt prefix: the GGUF's chat template rendered by jinja2 (llama-cpp-python's
    Jinja2ChatFormatter, not llama.cpp's template engine that edgequant uses) with the suite's system
    prompt and a marker as the user turn, cut at the marker, tokenized by llama-cpp-python's tokenizer."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from edgequant.profiles.suites import load_suite

    (ref,) = db_rows(q["db"], "SELECT path FROM artifacts WHERE quant = 'BF16'")
    llm = llama_cpp.Llama(model_path=ref["path"], vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]        # the tiny model has one: chat prompting
    fmt_chat = Jinja2ChatFormatter(template, eos_token="<eos>", bos_token="<bos>")
    suite = load_suite(str(q["suite"]))
    out = {}
    for fmt, spec in suite.formats.items():
        text = fmt_chat(messages=[{"role": "system", "content": spec.system},
                                  {"role": "user", "content": "@@CASE@@"}]).prompt
        head = text.partition("@@CASE@@")[0]
        assert head.startswith("<bos>")
        out[fmt] = len(llm.tokenize(head.encode(), add_bos=False, special=True))
    return out


def _bench_rows(q):
    out: dict[str, dict] = {}
    for r in db_rows(q["db"], "SELECT quant, metric, value, params, is_reference FROM measurements WHERE run_id = ?",
                     q["run_id"]):
        params = json.loads(r["params"])
        if params.get("stage") != "quality":
            out.setdefault(r["quant"], {"params": params, "ref": r["is_reference"]})[r["metric"]] = r["value"]
    return out


@pytest.mark.slow
def test_every_rung_is_stored_in_every_variant_with_its_parameters(variant_run):
    suite_depths = sorted(set(_suite_prefix_lengths(variant_run).values()))
    depths = [0, DEPTH] + [d for d in suite_depths if d not in (0, DEPTH)]
    rows = _bench_rows(variant_run)
    expected = set()
    for rung in ("BF16", "Q8_0"):
        for kv in ("f16", "q8_0"):
            for d in depths:
                parts = ([f"d{d}"] if d else []) + ([f"kv={kv}"] if kv != "f16" else [])
                expected.add(rung + ("@" + ",".join(parts) if parts else ""))
    assert set(rows) == expected
    for name, r in rows.items():
        p = r["params"]
        assert r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["ttft"] > 0 and r["peak_rss_anon"] > 0
        assert p.get("n_depth", 0) == (int(name.split("@d")[1].split(",")[0]) if "@d" in name else 0)
        assert p.get("cache_type", "f16") == ("q8_0" if "kv=q8_0" in name else "f16")
        assert p.get("flash_attn") == ("on" if "kv=q8_0" in name else "auto")
        if p.get("n_depth") in suite_depths and p["n_depth"] != DEPTH:
            assert p["depth_source"].startswith("suite mini: ")
        # one model load per rung: the load time is the first variant's alone
        assert ("load_time" in r) == (name in ("BF16", "Q8_0"))
    assert [q for q, r in rows.items() if r["ref"]] == ["BF16"]
    statuses = db_rows(variant_run["db"], "SELECT quant, status FROM rung_status WHERE run_id = ?",
                       variant_run["run_id"])
    assert {s["quant"] for s in statuses} >= expected and {s["status"] for s in statuses} == {"ok"}


@pytest.mark.slow
def test_a_quantized_kv_cache_is_evaluated_against_the_f16_reference(variant_run):
    q = variant_run
    cases = db_rows(q["db"], "SELECT quant, case_id FROM eval_cases WHERE run_id = ?", q["run_id"])
    by_rung: dict[str, set] = {}
    for c in cases:
        by_rung.setdefault(c["quant"], set()).add(c["case_id"])
    assert set(by_rung) == {"BF16", "Q8_0", "BF16@kv=q8_0", "Q8_0@kv=q8_0"}
    assert all(ids == {c["id"] for c in CASES} for ids in by_rung.values())
    quality = {}
    for r in db_rows(q["db"], "SELECT quant, metric, value, params FROM measurements WHERE run_id = ?", q["run_id"]):
        params = json.loads(r["params"])
        if params.get("stage") == "quality":
            quality.setdefault(r["quant"], (params, {}))[1][r["metric"]] = r["value"]
    params, metrics = quality["BF16@kv=q8_0"]
    assert params["cache_type"] == "q8_0" and params["flash_attn"] == "on"
    # the reference's own weights with a q8_0 cache, scored against its f16 cache: a divergence is measured
    assert 0.0 <= metrics["mean_kld"] and 0.0 <= metrics["top1_agreement"] <= 1.0
    assert "cache_type" not in quality["BF16"][0]


@pytest.mark.slow
def test_the_table_json_and_html_show_the_variants(variant_run):
    q = variant_run
    out = q["res"].stdout
    assert "Q8_0@d24,kv=q8_0" in out and "BF16@kv=q8_0" in out
    assert "RUNG@dN" in out and "suite mini:" in out                  # the footnote says what the names mean
    js = json.loads(run_cli("report", q["run_id"], "--format", "json", env=q["env"]).stdout)
    recs = {r["quant"]: r for r in js["rungs"]}
    assert recs["Q8_0@d24,kv=q8_0"]["n_depth"] == DEPTH and recs["Q8_0@d24,kv=q8_0"]["cache_type"] == "q8_0"
    assert recs["Q8_0"]["n_depth"] == 0 and recs["Q8_0"]["cache_type"] == "f16"
    # speedups compare with the reference in the same variant
    ref_tg = recs["BF16@d24,kv=q8_0"]["tg_tps"]
    assert recs["Q8_0@d24,kv=q8_0"]["tg_speedup"] == pytest.approx(recs["Q8_0@d24,kv=q8_0"]["tg_tps"] / ref_tg)
    html = q["tmp"] / "r.html"
    res = run_cli("report", q["run_id"], "--html", str(html), env=q["env"])
    assert res.returncode == 0, res.stderr
    page = html.read_text()
    assert "Q8_0@d24,kv=q8_0" in page and "llama-bench -d" in page


@pytest.mark.slow
def test_compare_and_pick_take_the_variants_as_rungs(variant_run):
    q = variant_run
    out = q["tmp"] / "cmp.json"
    res = run_cli("compare", q["run_id"], q["run_id"], "--json", str(out), env=q["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    pairs = {(p["quant"], p["stage"]) for p in json.loads(out.read_text())["pairs"]}
    assert ("Q8_0@d24,kv=q8_0", "bench") in pairs and ("Q8_0@kv=q8_0", "quality") in pairs
    res = run_cli("pick", "--run", q["run_id"], "--min-tg", "0.001", "--json", env=q["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Q8_0@d24,kv=q8_0" in res.stdout and "Q8_0@kv=q8_0" in res.stdout


def test_a_depth_beyond_the_models_context_is_refused_with_one_line(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    profile = variant_profile(tmp_path, [0, 4000], ["f16"])   # the tiny model's context is 2048
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert_one_line_error(res.stderr, "bench.depths", "2048", "4000")


def test_a_quantized_v_cache_with_flash_attention_off_is_refused_at_load(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    profile = variant_profile(tmp_path, [0], ["q4_0"])
    profile.write_text(profile.read_text() + 'flash_attn = "off"\n')
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "bench.cache_types[0]", "flash")


# ---------------------------------------------------------------------------
# on a phone: the ADB peer running the real linux-arm64 llama-bench under qemu

from test_device_run import _metrics, _run_args, _run_row, _statuses  # noqa: E402,F401


@pytest.mark.slow
def test_a_phone_measures_depths_and_cache_types_with_its_own_llama_bench(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    profile.write_text(profile.read_text().replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0"]')
                       .replace("warmup = 0", 'warmup = 0\ndepths = [0, 8]\ncache_types = ["f16", "q8_0"]'))
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _run_row(env)
    metrics = _metrics(env, run["run_id"])
    names = {f"{r}{s}" for r in ("BF16", "Q8_0") for s in ("", "@d8", "@kv=q8_0", "@d8,kv=q8_0")}
    assert set(metrics) == names
    assert _statuses(env, run["run_id"]) == {n: ("ok", None) for n in names}
    for name, m in metrics.items():
        p = m["tg_tps"]["params"]
        assert p["runner"] == "device" and p.get("n_depth", 0) == (8 if "@d8" in name else 0)
        assert p.get("cache_type", "f16") == ("q8_0" if "kv=" in name else "f16")
        assert m["pp_tps"]["value"] > 0 and m["tg_tps"]["value"] > 0 and m["tg_tps"]["repetitions"] == 3
        assert "throttled" in m and m["peak_rss_anon"]["value"] > 0
        assert ("load_time" in m) == ("@" not in name)
    # one llama-bench per cache type and rung, every depth in its own -d; q8_0 with flash attention on
    benches = [c for c in peer.events_of("process")
               if "bin/llama-bench" in c and not re.search(r"llama-bench'? -v ", c)]   # not the load-time probe
    per_rung = [c for c in benches if "Q8_0.gguf" in c]
    assert len(per_rung) == 2, per_rung
    assert all("-d 0,8" in c for c in per_rung)
    (quantized,) = [c for c in per_rung if "-ctk" in c]
    assert "-ctk q8_0 -ctv q8_0" in quantized and "-fa on" in quantized
