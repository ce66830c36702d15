"""``edgequant export --llama-bench``: a stored run as llama-bench rows (``-o json`` / ``-o sql``).

Each rung × device gives two llama-bench tests, as llama-bench itself
reports them: prompt processing (``n_prompt`` = N, ``n_gen`` = 0) and
generation (``n_prompt`` = 0, ``n_gen`` = M).  The field names, order and
types follow ``test::get_fields()``/``get_field_type()`` of the llama-bench in
the llama.cpp revision edgequant vendors (llama-cpp-python 0.3.36), so
llama.cpp's ``scripts/compare-llama-bench.py`` and other llama-bench tooling
read the files.

What edgequant does not vary is written with llama-bench's defaults for a CPU
run (``type_k``/``type_v`` f16, ``n_gpu_layers`` 0, ``split_mode`` layer, no
tensor split or overrides).  ``build_commit`` is the run id unless
``build_commit`` is given, so two runs of one llama.cpp build stay apart
(``compare-llama-bench.py -b RUN_A -c RUN_B``).  ``avg_ts``/``stddev_ts`` are
the stored tokens/s mean and sample stddev; ``avg_ns`` is the time per
repetition at that mean rate and ``stddev_ns`` its first-order spread
(``avg_ns * stddev_ts / avg_ts``), unless the row stored its per-repetition
tokens/s (host runs do): then ``samples_ns``/``samples_ts`` hold them and
``avg_ns``/``stddev_ns`` are their mean and sample stddev, as llama-bench
computes them.  Without samples the ``samples_*`` lists are empty.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from edgequant.core.errors import BadInput
from edgequant.results.store import Store

# (field, type) in llama-bench's order; types as llama-bench's get_field_type: STRING, INT, BOOL, FLOAT
FIELDS: tuple[tuple[str, str], ...] = (
    ("build_commit", "STRING"), ("build_number", "INT"), ("cpu_info", "STRING"), ("gpu_info", "STRING"),
    ("backends", "STRING"), ("model_filename", "STRING"), ("model_type", "STRING"), ("model_size", "INT"),
    ("model_n_params", "INT"), ("n_batch", "INT"), ("n_ubatch", "INT"), ("n_threads", "INT"),
    ("cpu_mask", "STRING"), ("cpu_strict", "BOOL"), ("poll", "INT"), ("type_k", "STRING"), ("type_v", "STRING"),
    ("n_gpu_layers", "INT"), ("n_cpu_moe", "INT"), ("split_mode", "STRING"), ("main_gpu", "INT"),
    ("no_kv_offload", "BOOL"), ("flash_attn", "INT"), ("devices", "STRING"), ("tensor_split", "STRING"),
    ("tensor_buft_overrides", "STRING"), ("load_mode", "STRING"), ("lazy_mode", "STRING"), ("embeddings", "BOOL"),
    ("no_op_offload", "INT"), ("no_host", "BOOL"), ("repack", "BOOL"), ("fit_target", "INT"),
    ("fit_min_ctx", "INT"), ("n_prompt", "INT"), ("n_gen", "INT"), ("n_depth", "INT"), ("test_time", "STRING"),
    ("avg_ns", "INT"), ("stddev_ns", "INT"), ("avg_ts", "FLOAT"), ("stddev_ts", "FLOAT"),
)
SQL_TYPES = {"STRING": "TEXT", "INT": "INTEGER", "BOOL": "INTEGER", "FLOAT": "REAL"}
# llama_flash_attn_type, by the names profiles use (llama-bench -fa)
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
FORMATS = ("json", "sql")


def _flash_attn(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return FLASH_ATTN.get(str(value), -1)


def _cpu_info(device: dict[str, Any], device_id: str, detail: dict | None) -> str:
    if isinstance(detail, dict) and detail.get("cpu_info"):  # llama-bench's own, from an on-device run
        return str(detail["cpu_info"])
    for k in ("cpu_model", "soc", "model"):
        if device.get(k):
            return str(device[k])
    return device_id


def _test(common: dict[str, Any], n_prompt: int, n_gen: int, row: dict[str, Any]) -> dict[str, Any]:
    avg_ts = float(row["value"])
    sd_ts = float(row["stddev"] or 0.0)
    n_tokens = n_prompt + n_gen
    detail = row.get("detail") or {}
    samples_ts = [float(x) for x in detail.get("samples", []) if float(x) > 0] if isinstance(detail, dict) else []
    samples_ns = [int(round(n_tokens / t * 1e9)) for t in samples_ts]
    if samples_ns:  # llama-bench's own definitions: mean and sample stddev of the per-repetition times
        avg_ns = int(statistics.fmean(samples_ns))
        sd_ns = int(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0
    else:  # only the rate's mean and stddev are stored: the time at the mean rate, first-order spread
        avg_ns = int(round(n_tokens / avg_ts * 1e9)) if avg_ts > 0 else 0
        sd_ns = int(round(avg_ns * sd_ts / avg_ts)) if avg_ts > 0 else 0
    out = {**common, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0,
           "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["measured_at"])),
           "avg_ns": avg_ns, "stddev_ns": sd_ns, "avg_ts": avg_ts, "stddev_ts": sd_ts}
    return {**{name: out[name] for name, _ in FIELDS}, "samples_ns": samples_ns, "samples_ts": samples_ts}


def llama_bench_rows(store: Store, run_id: str, build_commit: str | None = None) -> list[dict[str, Any]]:
    """The run's speed rows as llama-bench test records (pp first, then tg, per rung × device)."""
    run = store.run(run_id)
    rows = store.measurements(run["run_id"], stage="bench")
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["device_id"]), {})[r["metric"]] = r
    tests = []
    for (quant, device_id), metrics in groups.items():
        if "pp_tps" not in metrics and "tg_tps" not in metrics:
            continue  # a rung that failed before measuring
        any_row = metrics.get("tg_tps") or metrics["pp_tps"]
        params, device = any_row["params"], any_row["device"]
        art = store.artifact(any_row["artifact_sha256"]) or {}
        size = metrics.get("size", {}).get("value") or art.get("size_bytes") or 0
        n_params = metrics.get("n_params", {}).get("value") or art.get("n_params") or 0
        repack = params.get("repack")
        common = {
            "build_commit": build_commit or run["run_id"], "build_number": 0,
            "cpu_info": _cpu_info(device, device_id, (metrics.get("pp_tps") or any_row).get("detail")),
            "gpu_info": "", "backends": "CPU",
            "model_filename": art.get("path") or f"{any_row['model_id']}-{quant}.gguf",
            "model_type": f"{any_row['model_id']} {quant}", "model_size": int(size), "model_n_params": int(n_params),
            "n_batch": int(params.get("n_batch", 2048)), "n_ubatch": int(params.get("n_ubatch", 512)),
            "n_threads": int(params.get("threads", 0)), "cpu_mask": "0x0", "cpu_strict": False, "poll": 50,
            "type_k": "f16", "type_v": "f16", "n_gpu_layers": 0, "n_cpu_moe": 0, "split_mode": "layer",
            "main_gpu": 0, "no_kv_offload": False, "flash_attn": _flash_attn(params.get("flash_attn", "auto")),
            "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none",
            "load_mode": "mmap" if params.get("mmap", True) else "none", "lazy_mode": "auto",
            "embeddings": False, "no_op_offload": 0, "no_host": False,
            "repack": True if repack is None else bool(repack), "fit_target": 0, "fit_min_ctx": 0,
        }
        if "pp_tps" in metrics:
            tests.append(_test(common, int(params.get("n_prompt", 512)), 0, metrics["pp_tps"]))
        if "tg_tps" in metrics:
            tests.append(_test(common, 0, int(params.get("n_gen", 128)), metrics["tg_tps"]))
    if not tests:
        raise BadInput(f"run {run['run_id']} has no pp/tg measurements to export; "
                       f"export a run that benchmarked at least one rung")
    return tests


def _json_value(kind: str, value: Any) -> Any:
    if kind == "BOOL":
        return bool(value)
    return value


def render_json(tests: list[dict[str, Any]]) -> str:
    """llama-bench ``-o json``: an array of test objects, fields in llama-bench's order."""
    types = dict(FIELDS)
    out = [{k: _json_value(types.get(k, ""), v) for k, v in t.items()} for t in tests]
    return json.dumps(out, indent=2) + "\n"


def _sql_literal(kind: str, value: Any) -> str:
    if kind == "BOOL":
        text = "1" if value else "0"
    elif kind == "FLOAT":
        text = f"{float(value):.6f}"
    else:
        text = str(value)
    return "'" + text.replace("'", "''") + "'"


def render_sql(tests: list[dict[str, Any]]) -> str:
    """llama-bench ``-o sql``: CREATE TABLE IF NOT EXISTS llama_bench and one INSERT per test
    (every value quoted, as llama-bench writes them; quotes inside values are doubled)."""
    lines = ["CREATE TABLE IF NOT EXISTS llama_bench ("]
    lines += [f"  {name} {SQL_TYPES[kind]}{',' if i < len(FIELDS) - 1 else ''}" for i, (name, kind) in enumerate(FIELDS)]
    lines += [");", ""]
    names = ", ".join(name for name, _ in FIELDS)
    for t in tests:
        values = ", ".join(_sql_literal(kind, t[name]) for name, kind in FIELDS)
        lines.append(f"INSERT INTO llama_bench ({names}) VALUES ({values});")
    return "\n".join(lines) + "\n"
