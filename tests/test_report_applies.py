"""A report prints only the tables that apply: an eval run (quality only) has no speed table headed
`pp? t/s` with `threads ?, ? reps after ? warm-up`; a bench run keeps it, and so does a run whose rungs all
failed (the table lists how each ended).  A real SQLite store filled through the Store API."""

from __future__ import annotations

import io

from rich.console import Console

from edgequant.results import report as rep
from edgequant.results.store import Measurement, RowKey, Store

DEVICE = {"kind": "host", "hostname": "box", "cpu_model": "Test CPU", "physical_cores": 2}
BENCH = {"runner": "host", "threads": 2, "n_prompt": 64, "n_gen": 16, "repetitions": 3, "warmup": 1}
QUALITY = {"runner": "host", "stage": "quality", "suite": "triage", "n_cases": 4, "prompting": "completion"}


def _key(quant: str, params: dict) -> RowKey:
    return RowKey(model_id="org/m", model_hash="h", quant=quant, artifact_sha256="sha-" + quant,
                  is_reference=quant == "BF16", device_id="host:box", device=DEVICE, runtime="llama.cpp",
                  runtime_version="0.3.36", params=params)


def _run(store: Store, bench: bool, quality: bool, fail: bool = False) -> str:
    run_id = store.start_run("edgequant test", "tiny", "org/m", "h")
    for quant, rate in (("BF16", 1.0), ("Q4_0", 0.5)):
        if fail:
            store.record_rung(run_id, _key(quant, BENCH), [], status="crashed", detail="worker died")
            continue
        if bench:
            store.record_rung(run_id, _key(quant, BENCH), [Measurement("pp_tps", 500.0, "t/s", 5.0, 3),
                                                          Measurement("tg_tps", 50.0, "t/s", 1.0, 3)])
        if quality:
            store.record_rung(run_id, _key(quant, QUALITY), [Measurement("xml_parse_rate", rate, "ratio", None, 4)],
                              status=None if bench else "ok")
    store.finish_run(run_id, "complete")
    return run_id


def _table(store: Store, run_id: str) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    rep.render_table(rep.summarize(store, run_id), console)
    return console.export_text()


def test_an_eval_run_prints_no_speed_table(tmp_path):
    with Store(tmp_path / "r.db") as store:
        run_id = _run(store, bench=False, quality=True)
        text = _table(store, run_id)
        md = rep.render_markdown(rep.summarize(store, run_id))
    assert "quality against" in text
    for out in (text, md):
        assert "xml %" in out and "Q4_0" in out
        assert "t/s" not in out and "threads" not in out and "warm-up" not in out


def test_a_bench_run_keeps_its_speed_table(tmp_path):
    with Store(tmp_path / "r.db") as store:
        run_id = _run(store, bench=True, quality=True)
        text = _table(store, run_id)
        md = rep.render_markdown(rep.summarize(store, run_id))
    for out in (text, md):
        assert "pp64 t/s" in out and "tg16 t/s" in out
        assert "threads 2, 3 reps after 1 warm-up" in out
        assert "xml %" in out


def test_a_run_whose_rungs_all_failed_still_lists_them(tmp_path):
    with Store(tmp_path / "r.db") as store:
        run_id = _run(store, bench=True, quality=False, fail=True)
        text = _table(store, run_id)
    assert "crashed" in text and "Q4_0" in text and "status" in text
