"""Time `edgequant compare` over a large SQLite history (target: under 2 s with 10,000 runs).

Builds a results database with the store's own migrations, then fills it in
bulk: every run has the ladder's rungs with the bench figures and the quality
figures a real run stores; per-case eval rows go to every `--cases-every`-th
run and to the two runs compared.  Then it tags an old run `good` and times
`edgequant compare good last` as a user runs it (a new process, imports
included) and the comparison alone in-process.

    .venv/bin/python benchmarks/compare_speed.py                 # 10,000 runs in a temporary folder
    .venv/bin/python benchmarks/compare_speed.py --runs 2000 --db /tmp/h.db --keep
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTS = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K"]
BENCH_METRICS = [("size", "bytes"), ("bpw", "bits/weight"), ("n_params", "count"), ("load_time", "s"),
                 ("pp_tps", "t/s"), ("tg_tps", "t/s"), ("ttft", "ms"), ("peak_rss", "bytes"),
                 ("peak_rss_anon", "bytes"), ("peak_rss_file", "bytes")]
QUALITY_METRICS = ["xml_parse_rate", "array_parse_rate", "prose_parse_rate", "esi_parse_rate", "refusal_compliance",
                   "esi_exact", "esi_adjacent", "referral_accuracy", "referral_agreement", "esi_agreement",
                   "mean_kld", "top1_agreement"]
N_CASES = 82


def build(db: Path, n_runs: int, cases_every: int) -> tuple[str, str]:
    from edgequant.results.store import Store

    Store(db).close()  # the real schema, migrations included
    rng = random.Random(0)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    bench = json.dumps({"runner": "host", "threads": 2, "n_prompt": 512, "n_gen": 128, "repetitions": 3,
                        "warmup": 1, "n_batch": 2048, "n_ubatch": 512, "flash_attn": "auto", "mmap": True,
                        "repack": False}, sort_keys=True)
    quality = json.dumps({"runner": "host", "stage": "quality", "suite": "bench-suite", "suite_sha256": "s",
                          "threads": 2, "n_cases": N_CASES}, sort_keys=True)
    device = json.dumps({"cpu_model": "Bench CPU", "physical_cores": 2}, sort_keys=True)
    t0 = time.time() - n_runs * 3600
    run_ids = []
    conn.execute("BEGIN")
    for i in range(n_runs):
        run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t0 + i * 3600)) + f"-{i:06x}"
        run_ids.append(run_id)
        started = t0 + i * 3600
        conn.execute("INSERT INTO runs (run_id, started_at, finished_at, status, command, profile, model_id,"
                     " model_hash, edgequant_version, hostname, pid) VALUES (?, ?, ?, 'complete', 'edgequant run',"
                     " 'default', 'org/m', 'h', '0.1.0', 'bench', 1)", (run_id, started, started + 1800))
        mrows, srows = [], []
        with_cases = i % cases_every == 0 or i >= n_runs - 2
        for q in QUANTS:
            for metric, unit in BENCH_METRICS:
                sd = rng.uniform(0.1, 2.0) if metric in ("pp_tps", "tg_tps", "ttft") else None
                mrows.append((run_id, q, q == "BF16", bench, metric, rng.uniform(10, 1000), sd, 3, unit, started))
            for metric in QUALITY_METRICS:
                mrows.append((run_id, q, q == "BF16", quality, metric, rng.uniform(0.5, 1.0), None, N_CASES, "ratio",
                              started))
            srows.append((run_id, q))
            if with_cases:
                conn.executemany(
                    "INSERT INTO eval_cases (run_id, quant, device_id, suite, case_id, format, ok, refusal, reason,"
                    " fields, output, stopped, n_tokens) VALUES (?, ?, 'host:bench', 'bench-suite', ?, 'xml', ?, 0,"
                    " NULL, '{}', '<triage>...</triage>', 'eos', 40)",
                    [(run_id, q, f"case{c:03d}", int(rng.random() < 0.95)) for c in range(N_CASES)])
        conn.executemany(
            "INSERT INTO measurements (run_id, model_id, model_hash, quant, artifact_sha256, is_reference, device_id,"
            f" device, runtime, runtime_version, params, metric, value, stddev, repetitions, unit, measured_at)"
            f" VALUES (?, 'org/m', 'h', ?, 'sha', ?, 'host:bench', '{device}', 'llama.cpp', '0.3.36', ?, ?, ?, ?, ?,"
            f" ?, ?)", mrows)
        conn.executemany("INSERT INTO rung_status (run_id, quant, device_id, status) VALUES (?, ?, 'host:bench', 'ok')",
                         srows)
    conn.execute("COMMIT")
    conn.close()
    return run_ids[0], run_ids[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--cases-every", type=int, default=10, help="store per-case eval rows for every Nth run")
    ap.add_argument("--db", type=Path, default=None, help="where to build the history (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="edgequant-compare-speed-")
    db = args.db or Path(tmp.name) / "history.db"
    if db.exists():
        sys.exit(f"{db} exists; pass a new path")
    t = time.perf_counter()
    first, last = build(db, args.runs, args.cases_every)
    build_s = time.perf_counter() - t
    conn = sqlite3.connect(db)
    counts = {tbl: conn.execute(f"SELECT count(*) FROM {tbl}").fetchone()[0]
              for tbl in ("runs", "measurements", "eval_cases")}
    conn.close()
    size_mib = db.stat().st_size / 2**20
    print(f"history: {counts['runs']:,} runs, {counts['measurements']:,} measurement rows, "
          f"{counts['eval_cases']:,} eval case rows, {size_mib:,.0f} MiB (built in {build_s:.1f} s)")

    edgequant = [sys.executable, "-m", "edgequant.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    subprocess.run([*edgequant, "tag", first, "good", "--db", str(db)], check=True, env=env, capture_output=True)
    walls = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        r = subprocess.run([*edgequant, "compare", "good", "last", "--db", str(db)], env=env, capture_output=True,
                           text=True)
        walls.append(time.perf_counter() - t)
        if r.returncode not in (0, 1):
            sys.exit(f"compare failed (exit {r.returncode}): {r.stderr.strip()}")
    from edgequant.results.compare import compare_runs
    from edgequant.results.gates import load_gates
    from edgequant.results.store import Store

    inproc = []
    with Store(db) as store:
        for _ in range(args.repeat):
            t = time.perf_counter()
            cmp = compare_runs(store, "good", "last", load_gates())
            inproc.append(time.perf_counter() - t)
    print(f"edgequant compare good last (new process, exit {r.returncode}): median {statistics.median(walls):.2f} s "
          f"over {args.repeat} (min {min(walls):.2f}, max {max(walls):.2f}); target < 2 s")
    print(f"compare_runs in-process: median {statistics.median(inproc) * 1000:.0f} ms "
          f"({len(cmp.pairs)} pairs, {len(cmp.results)} gate checks)")
    if args.keep:
        print(f"kept {db}")
    else:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
