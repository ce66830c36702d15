#!/usr/bin/env python
"""How close is `edgequant run`'s time estimate to the time the run takes? (run by hand; prints figures)

1. the estimate `run` prints before it starts (``edgequant.estimate.plan_run``: the model's size, the
   profile, the suite and this place's stored speed in the database used), per stage and in total;
2. a real `edgequant run` with the same model, profile and suite, into a fresh cache (so the conversion
   and every quantization are measured too; --reuse-cache uses the shared one) and the given database;
3. per stage: estimated vs actual seconds (the run's ``stage_resources`` rows), the ratio, and the
   stage's peak RSS; then the total, against the sum of the stages and against the wall time.

Target: every stage and the total within 30 % (ratio between 0.7 and 1.3).  Usage:
    .venv/bin/python benchmarks/estimate_accuracy.py [--model CHECKPOINT] [--profile quick] \
        [--suite NAME|PATH | --no-quality] [--db PATH] [--reuse-cache] [-- extra run options]
Without --model the embedded default (Gemma 3 270M) is used.  Run it twice with the same --db: the first
run is estimated from the defaults, the second from the first's history.  Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the embedded Gemma 3 270M)")
    ap.add_argument("--profile", default="quick", help="profile name or path (default: quick)")
    ap.add_argument("--suite", default=None, help="eval suite name or path (default: the profile's, triage)")
    ap.add_argument("--no-quality", action="store_true", help="speed and memory only")
    ap.add_argument("--db", default=None, help="results database (default: a new one in a temporary folder)")
    ap.add_argument("--reuse-cache", action="store_true",
                    help="use the shared cache (cached rungs are neither converted nor quantized again)")
    ap.add_argument("extra", nargs="*", help="more `edgequant run` options, after --")
    args = ap.parse_args()

    from edgequant import estimate
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import NullReporter
    from edgequant.core.paths import cache_dir
    from edgequant.profiles import load_profile
    from edgequant.profiles.suites import load_suite
    from edgequant.results.store import Store

    work = Path(tempfile.mkdtemp(prefix="estimate-accuracy-"))
    db = args.db or str(work / "results.db")
    shared = cache_dir()
    cache = shared if args.reuse_cache else work / "cache"
    if not args.reuse_cache and args.model is None:     # the default checkpoint, not the artifacts built from it
        (cache / "models").mkdir(parents=True, exist_ok=True)
        for model in (shared / "models").glob("*"):
            os.symlink(model, cache / "models" / model.name)
    profile = load_profile(args.profile)
    suite = None if args.no_quality else load_suite(args.suite or "triage")
    resolved = prepare.resolve_model(args.model, cache, NullReporter())
    with Store(db) as store:
        plan = estimate.plan_run(resolved, profile, suite, cache, store)
    print(f"model {resolved.checkpoint.model_id} ({resolved.checkpoint.n_params_estimate / 1e6:,.0f} M parameters), "
          f"profile {profile.name}, " + (f"suite {suite.name} ({len(suite.cases)} cases)" if suite else "no eval"))
    for line in estimate.format_plan(plan):
        print(f"  estimate: {line}")

    cmd = [sys.executable, "-m", "edgequant.cli", "run", "--profile", args.profile, "--db", db,
           "--cache-dir", str(cache)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--no-quality"] if args.no_quality else (["--suite", args.suite] if args.suite else [])
    cmd += args.extra
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    with Store(db) as store:
        run_id = store.run("last")["run_id"]
        rows = store.stage_resources(run_id)

    actual: dict[str, float] = {}
    peak: dict[str, float] = {}
    for r in rows:
        if r["reused"] or r["seconds"] is None:     # a cached artifact: built by another run
            continue
        actual[r["stage"]] = actual.get(r["stage"], 0.0) + r["seconds"]
        peak[r["stage"]] = max(peak.get(r["stage"], 0.0), r["peak_rss_bytes"] or 0.0)
    est = plan.by_stage()
    print(f"\nrun {run_id} (exit {proc.returncode}); wall {wall:.1f} s")
    print(f"{'stage':<16}{'estimated s':>12}{'actual s':>10}{'ratio':>8}{'peak RSS MiB':>14}  within 30 %")
    ok = True
    for stage in estimate.STAGE_ORDER:
        e, a = est.get(stage, 0.0), actual.get(stage)
        if a is None and not e:
            continue
        ratio = (a / e) if (a is not None and e) else None
        good = ratio is not None and abs(ratio - 1) <= TARGET
        ok &= good or (a is None and e == 0)
        print(f"{stage:<16}{e:>12.1f}{(a if a is not None else float('nan')):>10.1f}"
              f"{(ratio if ratio is not None else float('nan')):>8.2f}"
              f"{peak.get(stage, 0.0) / 2**20:>14,.0f}  {'yes' if good else 'NO'}")
    total_e, total_a = plan.total_seconds, sum(actual.values())
    for name, a in (("total (stages)", total_a), ("total (wall)", wall)):
        ratio = a / total_e if total_e else float("nan")
        good = abs(ratio - 1) <= TARGET
        ok &= good
        print(f"{name:<16}{total_e:>12.1f}{a:>10.1f}{ratio:>8.2f}{'':>14}  {'yes' if good else 'NO'}")
    print("\nthe wall time also holds start-up, hashing, waiting for a quiet machine and the report; "
          "measure on a quiet machine (figures from a busy one mean nothing)")
    if not args.reuse_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
