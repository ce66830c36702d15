#!/usr/bin/env python
"""Importance-matrix and tune targets, printed (run by hand; not a test).

1. On the model (default: the embedded Gemma 3 270M), the imatrix Q4_K_M and
   Q3_K_M rungs against the plain ones: mean KLD against the BF16 reference
   on the suite's held-apart evaluation cases (the other half calibrates the
   imatrix).  Target: imatrix lower than plain for both types; the script says
   plainly when it is not.
2. `edgequant tune --device host` with the issue's gates on the same model.
   Target: finishes in under 30 minutes on 2 cores.  The time is printed.

Both go through the real CLI into a fresh results database (artifacts, the
imatrix and the reference outputs are cached in the normal cache, so a second
run of this script is much faster; pass --cache-dir to start cold).

Usage:
    .venv/bin/python benchmarks/imatrix_targets.py [--model PATH] [--suite triage] [--skip-tune] [--text-kld]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("Q4_K_M", "Q3_K_M")
TUNE_LIMIT_S = 30 * 60


def cli(*args: str) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgequant.cli", *args], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode not in (0, 2):
        sys.stderr.write(proc.stderr[-3000:])
    return proc.returncode, time.monotonic() - t0, proc.stdout + proc.stderr


def kld_target(work: Path, common: list[str]) -> None:
    profile = work / "imatrix-targets.toml"
    types = [t + v for t in TYPES for v in ("", "+imatrix")]
    profile.write_text('[profile]\nname = "imatrix-targets"\n[quantize]\n'
                       f'types = {json.dumps(types)}\n')
    db = work / "kld.db"
    code, seconds, out = cli("eval", "--profile", str(profile), "--db", str(db), *common)
    print(f"edgequant eval on the evaluation half: exit {code} in {seconds:.0f} s")
    if code != 0:
        print(out[-2000:])
        return
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT quant, metric, value, repetitions, params FROM measurements"
                        " WHERE metric IN ('mean_kld', 'top1_agreement', 'p99_kld')").fetchall()
    vals = {(q, m): (v, n) for q, m, v, n, _ in rows}
    split = {json.loads(p).get("split") for *_, p in rows}
    n_cases = {json.loads(p).get("n_cases") for *_, p in rows}
    print(f"split {', '.join(s[:12] for s in split if s)} · {', '.join(str(n) for n in n_cases)} evaluation cases")
    print(f"{'rung':<18} {'mean KLD':>10} {'p99 KLD':>10} {'top-1':>8} {'tokens':>8}")
    for q in types:
        kld, n = vals.get((q, "mean_kld"), (float("nan"), 0))
        p99, _ = vals.get((q, "p99_kld"), (float("nan"), 0))
        top1, _ = vals.get((q, "top1_agreement"), (float("nan"), 0))
        print(f"{q:<18} {kld:>10.5f} {p99:>10.4f} {top1:>8.3f} {n or 0:>8}")
    for t in TYPES:
        plain, imx = vals.get((t, "mean_kld"), (None,))[0], vals.get((t + "+imatrix", "mean_kld"), (None,))[0]
        if plain is None or imx is None:
            print(f"{t}: missing a figure; target not checked")
        elif imx < plain:
            print(f"{t}: imatrix mean KLD {imx:.5f} < plain {plain:.5f} ({(1 - imx / plain) * 100:.1f} % lower): "
                  f"target met")
        else:
            print(f"{t}: imatrix mean KLD {imx:.5f} is NOT lower than plain {plain:.5f}: target not met")


def text_kld_target(work: Path, common: list[str], n_ctx: int = 128) -> None:
    """The quick variant: teacher-forced KLD on the evaluation cases' own prompts (without the
    few-shot blocks, which the calibration text contains too), chunked like llama-perplexity, with the
    worker's full-vocabulary KLD code.  No generation, so it takes minutes instead of the full eval."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_targets import edgequant_kld

    from edgequant.profiles import BenchSettings
    from edgequant.profiles.suites import load_suite
    from edgequant.quantize.imatrix import split_suite, subset_suite

    suite_name = common[common.index("--suite") + 1]
    suite = load_suite(suite_name)
    evaluation = subset_suite(suite, split_suite(suite), "evaluation")
    text = "\n\n".join(c.prompt for c in evaluation.cases)
    profile = work / "imatrix-targets.toml"
    types = [t + v for t in TYPES for v in ("", "+imatrix")]
    profile.write_text('[profile]\nname = "imatrix-targets"\n[quantize]\n'
                       f'types = {json.dumps(types)}\n')
    code, seconds, out = cli("quantize", "--profile", str(profile), "--json", *common)
    if code != 0:
        print(out[-2000:])
        return
    arts = {a["quant"]: Path(a["path"]) for a in json.loads(out[:out.rindex("]") + 1])}
    threads = BenchSettings().resolved_threads()
    print(f"teacher-forced KLD on the {len(evaluation.cases)} evaluation case prompts of {suite.name} "
          f"(n_ctx {n_ctx}, second half of each chunk scored)")
    kld = {}
    for q in types:
        kld[q], top1, n = edgequant_kld(arts["BF16"], arts[q], text, n_ctx, threads)
        print(f"{q:<18} mean KLD {kld[q]:.5f}  top-1 {top1:.3f}  ({n} tokens)")
    for t in TYPES:
        plain, imx = kld[t], kld[t + "+imatrix"]
        verdict = "target met" if imx < plain else "target NOT met: the imatrix does not lower the KLD"
        print(f"{t}: imatrix {imx:.5f} vs plain {plain:.5f} ({(1 - imx / plain) * 100:+.1f} %): {verdict}")


def tune_target(work: Path, common: list[str]) -> None:
    db = work / "tune.db"
    code, seconds, out = cli("tune", "--device", "host", "--gate", "xml_parse_rate>=0.95",
                             "--gate", "esi_adjacent>=0.95", "--db", str(db), *common)
    last = [ln for ln in out.splitlines() if ln.startswith(("chosen:", "edgequant: error:"))]
    print(f"edgequant tune: exit {code} in {seconds / 60:.1f} min "
          f"({'under' if seconds < TUNE_LIMIT_S else 'OVER'} the 30-minute target)")
    for ln in last:
        print("  " + ln)
    conn = sqlite3.connect(db)
    for quant, status, detail in conn.execute("SELECT quant, status, detail FROM rung_status ORDER BY rowid"):
        print(f"  {quant:<22} {status:<9} {detail or ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded 270M)")
    ap.add_argument("--suite", default="triage")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--skip-tune", action="store_true")
    ap.add_argument("--skip-kld", action="store_true")
    ap.add_argument("--text-kld", action="store_true",
                    help="measure KLD by teacher forcing on the evaluation prompts instead of the full eval "
                         "(a minute instead of half an hour on 2 cores)")
    args = ap.parse_args()
    common = ["--suite", args.suite]
    if args.model:
        common += ["--model", args.model]
    if args.cache_dir:
        common += ["--cache-dir", args.cache_dir]
    with tempfile.TemporaryDirectory(prefix="imatrix-targets-") as tmp:
        work = Path(tmp)
        if args.text_kld:
            text_kld_target(work, common)
        elif not args.skip_kld:
            kld_target(work, common)
        if not args.skip_tune:
            tune_target(work, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
