"""Issue 18's variants on a phone, end to end through the ADB peer and the real linux-arm64 llama.cpp tools
under qemu: energy per token for every depth / KV-cache-type variant and for every run of a ``[sustained]``
series (the peer's battery draws more while llama-bench runs, and its USB charging is switched), and
``--quality-on-device`` evaluating each rung again with a quantized KV cache (llama-completion's
``-ctk/-ctv`` with flash attention on)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from conftest import db_rows, run_cli
from test_device_quality import CASES as PHONE_CASES
from test_device_quality import SUITE as PHONE_SUITE
from test_device_run import _run_args, _run_row  # noqa: F401
from test_energy import BUSY_W, IDLE_W, energy_rows

# long enough for several 0.2 s power samples in each tg window on a quiet machine (qemu: tens of tokens/s)
N_GEN = 32
SUSTAINED_GEN = 48
VARIANTS = ("", "@d8", "@kv=q8_0", "@d8,kv=q8_0")
NAMES = {f"{r}{v}" for r in ("BF16", "Q8_0") for v in VARIANTS}


def _benches(peer, gguf: str, n_gen: int) -> list[str]:
    """The measuring llama-bench command lines of one rung (not the load-time probe)."""
    return [c for c in peer.events_of("process") if "bin/llama-bench" in c and gguf in c
            and not re.search(r"llama-bench'? -v ", c) and f"-n {n_gen} " in c]


def _sustained_energy(env, run_id) -> tuple[dict[int, dict], list[dict]]:
    """(run number -> its energy rows, the curve stored in sustained_tg_tps' detail)."""
    per_run: dict[int, dict] = {}
    curve = []
    for r in db_rows(Path(env["EDGEQUANT_DB"]), "SELECT metric, value, params, detail FROM measurements"
                                                " WHERE run_id = ?", run_id):
        params = json.loads(r["params"])
        if params.get("stage") != "sustained":
            continue
        detail = json.loads(r["detail"]) if r["detail"] else None
        if "run" in params:
            per_run.setdefault(params["run"], {})[r["metric"]] = {"value": r["value"], "detail": detail}
        elif r["metric"] == "sustained_tg_tps":
            curve = detail["runs"]
    return per_run, curve


@pytest.mark.slow
def test_energy_of_every_variant_and_every_sustained_run_on_a_phone(tiny_checkpoint, phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = phone
    supply = peer.power_supply()
    text = (profile.read_text().replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0"]')
            .replace("n_gen = 4", f"n_gen = {N_GEN}")
            .replace("warmup = 0", 'warmup = 0\ndepths = [0, 8]\ncache_types = ["f16", "q8_0"]'))
    profile.write_text(text + f'energy = true\npower_supply = "{supply}"\n'      # appended to [device]
                       + f'\n[sustained]\nruns = 2\nn_gen = {SUSTAINED_GEN}\nrung = "Q8_0"\n')
    peer.simulate_heat()

    # 1. on the USB cable: every variant and sustained run stored as not measured with the reason; the
    # variants keep one llama-bench per cache type (every depth in its -d): no power is sampled
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = _run_row(env)["run_id"]
    rows = energy_rows(env, run_id)
    assert set(rows) == NAMES
    for r in rows.values():
        assert "avg_power" not in r and "charging (usb powered)" in r["energy_per_token"]["detail"]["not_measured"]
    per_run, curve = _sustained_energy(env, run_id)
    assert set(per_run) == {1, 2} and len(curve) == 2
    for n, r in per_run.items():
        assert set(r) == {"energy_per_token"} and "charging" in r["energy_per_token"]["detail"]["not_measured"]
        assert "charging" in curve[n - 1]["energy"]["not_measured"]
    grouped = _benches(peer, "Q8_0.gguf", N_GEN)
    assert len(grouped) == 2 and all("-d 0,8" in c for c in grouped), grouped
    assert "not measured" in res.stdout
    before = len(_benches(peer, "Q8_0.gguf", N_GEN))

    # 2. cable out: joules per generated token for each variant, from its own llama-bench run
    peer.set_charging(False)
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = _run_row(env)["run_id"]
    rows = energy_rows(env, run_id)
    assert set(rows) == NAMES
    for name, r in rows.items():
        d = r["energy_per_token"]["detail"]
        assert d["tokens"] == N_GEN * 3 and d["samples"] >= 2, name
        assert IDLE_W <= r["avg_power"]["value"] <= BUSY_W + 1e-9, name
        assert r["avg_power"]["value"] > (IDLE_W + BUSY_W) / 2, name     # the tail of the run is its busy tg test
        assert r["energy_per_token"]["value"] == pytest.approx(r["avg_power"]["value"] * d["seconds"] / d["tokens"])
    # one llama-bench per variant, each with its one depth, so the run's last tg test is the variant's
    separate = _benches(peer, "Q8_0.gguf", N_GEN)[before:]
    assert len(separate) == 4, separate
    assert sorted("-d 8" in c for c in separate) == [False, False, True, True]
    assert not any("-d 0,8" in c for c in separate)
    assert sorted("-ctk q8_0 -ctv q8_0" in c and "-fa on" in c for c in separate) == [False, False, True, True]

    # every sustained run: its own rows (the run's number in the parameters) and the same figures in the curve
    per_run, curve = _sustained_energy(env, run_id)
    assert set(per_run) == {1, 2} and [c["run"] for c in curve] == [1, 2]
    for n, r in per_run.items():
        e = r["energy_per_token"]
        assert e["detail"]["tokens"] == SUSTAINED_GEN and e["detail"]["samples"] >= 2
        assert IDLE_W <= r["avg_power"]["value"] <= BUSY_W + 1e-9
        assert e["value"] == pytest.approx(r["avg_power"]["value"] * e["detail"]["seconds"] / SUSTAINED_GEN)
        assert curve[n - 1]["energy"]["j_per_token"] == pytest.approx(e["value"])
    # the sustained rows do not replace the plain rung's own energy
    plain = rows["Q8_0"]["energy_per_token"]
    assert plain["detail"]["tokens"] == N_GEN * 3

    # table, JSON and HTML
    out = res.stdout
    energy_table = out[out.index("energy per generated token"):]
    assert all(name in energy_table for name in ("Q8_0@d8,kv=q8_0", "BF16@kv=q8_0", "Q8_0@d8"))
    assert "J/token first → last" in out
    js = json.loads(run_cli("report", run_id, "--format", "json", env=env).stdout)
    recs = {r["quant"]: r for r in js["rungs"]}
    assert recs["Q8_0@d8,kv=q8_0"]["energy_j_per_token"] == pytest.approx(rows["Q8_0@d8,kv=q8_0"]
                                                                          ["energy_per_token"]["value"])
    assert recs["Q8_0"]["energy_j_per_token"] == pytest.approx(plain["value"])
    (sus,) = js["sustained"]
    assert sus["energy_j_per_token"] == pytest.approx([per_run[1]["energy_per_token"]["value"],
                                                       per_run[2]["energy_per_token"]["value"]])
    html = tmp_path / "r.html"
    res = run_cli("report", run_id, "--html", str(html), env=env)
    assert res.returncode == 0, res.stderr
    page = html.read_text()
    energy_html = page[page.index("energy per generated token"):]
    assert "Q8_0@d8,kv=q8_0" in energy_html and "J/token first → last" in page


def _host_outputs(gguf: Path, suite_path: Path, cache_type: str) -> dict[str, str]:
    """The host eval's own greedy outputs for this GGUF with a KV cache of ``cache_type`` (its worker, in-process
    llama.cpp's type_k/type_v, flash attention on)."""
    from edgequant.bench.quality import base_request, call_worker
    from edgequant.profiles.suites import load_suite

    suite = load_suite(suite_path)
    req = {**base_request(gguf, suite, 2, None, "auto"), "cache_type": cache_type, "flash_attn": "on"}
    data = call_worker(req, 600, lambda p: None)
    return {c["id"]: base64.b64decode(c["output_b64"]).decode("utf-8", "replace") for c in data["cases"]}


@pytest.mark.slow
def test_quality_on_device_runs_each_quantized_kv_cache_type(tiny_checkpoint, phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = phone
    profile.write_text(profile.read_text().replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0"]')
                       .replace("warmup = 0", 'warmup = 0\ncache_types = ["f16", "q8_0"]'))
    (tmp_path / "phone-mini.jsonl").write_text("\n".join(json.dumps(c) for c in PHONE_CASES) + "\n")
    suite = tmp_path / "phone-mini.toml"
    suite.write_text(PHONE_SUITE)
    args = [a for a in _run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner) if a != "--no-quality"]
    res = run_cli(*args, "--suite", str(suite), "--quality-on-device", env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    db = Path(env["EDGEQUANT_DB"])
    run_id = _run_row(env)["run_id"]
    quality = {}
    for r in db_rows(db, "SELECT quant, metric, value, params FROM measurements WHERE run_id = ?", run_id):
        params = json.loads(r["params"])
        if params.get("stage") == "quality":
            quality.setdefault(r["quant"], (params, {}))[1][r["metric"]] = r["value"]
    assert set(quality) == {"BF16", "Q8_0", "BF16@kv=q8_0", "Q8_0@kv=q8_0"}
    for name, (params, _) in quality.items():
        assert params["where"] == "device"
        assert params.get("cache_type", "f16") == ("q8_0" if "kv=" in name else "f16")
        assert params.get("flash_attn") == ("on" if "kv=" in name else None)
    # llama-completion ran each case of each rung once more with the quantized cache and flash attention: the
    # scripts pushed to the phone's run folder, and which rung each ran on
    folder = Path(workdir) / "runs" / run_id
    plain, quantized = (folder / "quality.sh").read_text(), (folder / "quality-kv=q8_0.sh").read_text()
    case_lines = [ln for ln in quantized.splitlines() if ln.startswith("one ")]
    assert len(case_lines) == len(PHONE_CASES)
    assert all("-ctk q8_0 -ctv q8_0 -fa on" in ln and "llama-completion" in ln for ln in case_lines)
    assert "-ctk" not in plain and len([ln for ln in plain.splitlines() if ln.startswith("one ")]) == len(PHONE_CASES)
    shells = [c for c in peer.events_of("process") if "quality-kv=q8_0.sh" in c]
    assert sorted(m for c in shells for m in re.findall(r"(BF16|Q8_0)\.gguf", c)) == ["BF16", "Q8_0"], shells
    # the phone's outputs with a q8_0 cache are the host eval's with the same cache
    cases = {(c["quant"], c["case_id"]): c["output"]
             for c in db_rows(db, "SELECT quant, case_id, output FROM eval_cases WHERE run_id = ?", run_id)}
    (ref,) = db_rows(db, "SELECT path FROM artifacts WHERE quant = 'BF16'")
    host = _host_outputs(Path(ref["path"]), suite, "q8_0")
    for case in PHONE_CASES:
        assert cases[("BF16@kv=q8_0", case["id"])] == host[case["id"]], case["id"]
    # judged against the phone's own f16 reference: agreement is a fraction, and the table shows the variants
    assert "BF16@kv=q8_0" in res.stdout and "Q8_0@kv=q8_0" in res.stdout


# ---------------------------------------------------------------------------
# the pieces, without a phone


def test_energy_splits_the_variants_into_one_llama_bench_each():
    from edgequant.pipeline.device_run import _variant_invocations
    from edgequant.profiles.variants import BenchVariant

    variants = [BenchVariant(d, t) for t in ("f16", "q8_0") for d in (0, 8)]
    grouped = _variant_invocations(variants, per_variant=False)
    assert [[(v.depth, v.cache_type) for v in g] for g in grouped] == [[(0, "f16"), (8, "f16")],
                                                                      [(0, "q8_0"), (8, "q8_0")]]
    assert _variant_invocations(variants, per_variant=True) == [[v] for v in variants]


def test_sustained_energy_rows_do_not_replace_the_rungs_own(tmp_path):
    """A plain rung's energy and its sustained runs' energy, stored through the store API: the report shows
    each where it belongs (hand-made figures, so the expected values are known)."""
    from dataclasses import replace

    from edgequant.bench.sustained import SustainedRun
    from edgequant.pipeline.host import sustained_energy_rows, sustained_measurements
    from edgequant.results.report import sustained_cells, energy_records, summarize, sustained_records
    from edgequant.results.store import Measurement, RowKey, Store

    with Store(tmp_path / "r.db") as store:
        run_id = store.start_run("edgequant run", "p", "m", "h")
        key = RowKey(model_id="m", model_hash="h", quant="Q8_0", artifact_sha256="s", is_reference=False,
                     device_id="adb:x", device={"kind": "android"}, runtime="llama.cpp", runtime_version="0",
                     params={"runner": "device"})
        store.record_rung(run_id, key, [Measurement("tg_tps", 10.0, "t/s"),
                                        Measurement("avg_power", 5.0, "W"),
                                        Measurement("energy_per_token", 0.5, "J/token")])
        runs = [SustainedRun(1, 10.0, energy={"j_per_token": 0.9, "watts": 9.0, "samples": 4, "seconds": 1.0,
                                              "tokens": 10}),
                SustainedRun(2, 8.0, energy={"j_per_token": 0.8, "watts": 6.4, "samples": 4, "seconds": 1.25,
                                             "tokens": 10})]
        params = {"runner": "device", "stage": "sustained", "runs": 2}
        sustained = replace(key, params=params)
        store.record_rungs(run_id, [(sustained, sustained_measurements(runs), None, None)]
                           + [(replace(key, params={**params, "run": r.run}),
                               sustained_energy_rows(r), None, None) for r in runs])
        per_run = [r for r in store.measurements(run_id) if "run" in r["params"]]
        assert sorted((r["params"]["run"], r["metric"], r["value"]) for r in per_run) == [
            (1, "avg_power", 9.0), (1, "energy_per_token", 0.9), (2, "avg_power", 6.4), (2, "energy_per_token", 0.8)]
        rep = summarize(store, run_id)
    (plain,) = energy_records(rep)
    assert plain["energy_j_per_token"] == 0.5 and plain["avg_power_w"] == 5.0
    (rec,) = sustained_records(rep)
    assert rec["energy_j_per_token"] == [0.9, 0.8] and rec["drop_pct"] == pytest.approx(20.0)
    assert sustained_cells(rec)[-1] == "0.900 → 0.800"
    charging = dict(rec, energy_j_per_token=[None, None], energy_not_measured="the phone is charging (usb powered)")
    assert sustained_cells(charging)[-1] == "not measured (charging)"
