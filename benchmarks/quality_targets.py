#!/usr/bin/env python
"""Quality targets of edgequant, printed (run by hand; not a test).

1. KLD agreement with llama.cpp: on the same text and the same two GGUF files,
   edgequant's mean KLD and top-1 agreement next to `llama-perplexity
   --kl-divergence` (built from the llama.cpp source vendored in the installed
   llama-cpp-python).  Target: within 10 % (relative).
   edgequant scores like llama-perplexity here (same chunks, same scored
   positions), with the full-vocabulary KLD code of its eval worker.
2. Eval throughput: for a stored run, tokens/s generated while running the
   suite (eval_tg_tps) against the rung's plain generation speed (tg_tps).
   Target: at least 0.8x.

Usage:
    .venv/bin/python benchmarks/quality_targets.py --ref BF16.gguf --test Q4_K_M.gguf [--text FILE]
    .venv/bin/python benchmarks/quality_targets.py --db results.db --run RUN_ID
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def default_text() -> str:
    """The built-in suite's prompts and few-shot blocks: clinical English like the eval's."""
    from edgequant.profiles.suites import load_suite

    suite = load_suite("triage")
    parts = [f.few_shot.replace("{prompt}", "") for f in suite.formats.values()]
    parts += [c.prompt for c in suite.cases]
    return "\n\n".join(parts * 2)


def edgequant_kld(ref: Path, test: Path, text: str, n_ctx: int, threads: int) -> tuple[float, float, int]:
    """Mean KLD(ref || test) and top-1 agreement, with the worker's code, chunked as llama-perplexity does:
    the text tokenized with BOS, cut into n_ctx-token chunks whose first token is set to BOS, and the
    positions from n_ctx/2 to n_ctx-2 of each chunk scored (each predicts the next token)."""
    import llama_cpp as L

    from edgequant.bench.eval_worker import Session, kld_rows
    from edgequant.bench.host_worker import WorkerLog

    log = WorkerLog(L, False)
    sessions = [Session(L, {"path": str(p), "threads": threads, "repack": False, "mmap": True}, log)
                for p in (ref, test)]
    tokens = sessions[0].tokenize(text, add_special=True)
    first = n_ctx // 2
    klds, same = [], []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = list(tokens[start:start + n_ctx])
        chunk[0] = L.llama_vocab_bos(sessions[0].vocab)
        rows = []
        for sess in sessions:
            sess.ensure_context(n_ctx)
            L.llama_memory_clear(sess.mem, False)
            sess.decode(chunk, logits_all=True)
            rows.append(np.stack([sess.logits(i) for i in range(first, n_ctx - 1)]))
        d, t = kld_rows(rows[0], rows[1])
        klds += d.tolist()
        same += t.tolist()
    for sess in sessions:
        sess.close()
    return float(np.mean(klds)), float(np.mean(same)), len(klds)


def perplexity_kld(ref: Path, test: Path, text_file: Path, n_ctx: int, threads: int) -> tuple[float, float]:
    from edgequant.bench.llamacpp_tools import build_llama_tool

    exe = build_llama_tool("llama-perplexity", on_progress=lambda m: print(f"  {m}", file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.kld"
        # repacking off, as edgequant's default on AMX hosts (where it crashes)
        common = ["-f", str(text_file), "-c", str(n_ctx), "-t", str(threads)]
        if _has_repack(exe):
            common.append("--no-repack")
        base_run = subprocess.run([str(exe), "-m", str(ref), "--kl-divergence-base", str(base), *common],
                                  capture_output=True, text=True)
        if base_run.returncode != 0:
            raise SystemExit("llama-perplexity failed on the reference:\n" + base_run.stderr[-2000:])
        res = subprocess.run([str(exe), "-m", str(test), "--kl-divergence-base", str(base), "--kl-divergence",
                              *common], check=True, capture_output=True, text=True)
    log = res.stdout + res.stderr
    kld = re.search(r"Mean\s+KLD:\s*([0-9.eE+-]+)", log)
    same = re.search(r"Same top p:\s*([0-9.]+)", log)
    if not kld or not same:
        raise SystemExit("could not read llama-perplexity's KLD output:\n" + log[-2000:])
    return float(kld.group(1)), float(same.group(1)) / 100.0


def _has_repack(exe: Path) -> bool:
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    return "--repack" in res.stdout + res.stderr


def throughput(db: Path, run_id: str) -> None:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT quant, metric, value FROM measurements WHERE run_id = ? AND metric IN"
                        " ('tg_tps', 'eval_tg_tps')", (run_id,)).fetchall()
    by: dict[str, dict[str, float]] = {}
    for q, m, v in rows:
        by.setdefault(q, {})[m] = v
    print(f"eval throughput, run {run_id} (target eval >= 0.8 x tg)")
    for q, m in by.items():
        if "tg_tps" in m and "eval_tg_tps" in m:
            r = m["eval_tg_tps"] / m["tg_tps"]
            print(f"  {q:8s} tg {m['tg_tps']:8.1f} t/s  eval {m['eval_tg_tps']:8.1f} t/s  ratio {r:.2f}  "
                  f"{'PASS' if r >= 0.8 else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, help="reference GGUF (e.g. the BF16 rung)")
    ap.add_argument("--test", type=Path, action="append", default=[], help="quantized GGUF (repeatable)")
    ap.add_argument("--text", type=Path, help="text file to score (default: the built-in suite's text)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--db", type=Path)
    ap.add_argument("--run")
    args = ap.parse_args()
    if args.ref and args.test:
        with tempfile.TemporaryDirectory() as tmp:
            text_file = args.text or Path(tmp) / "text.txt"
            if not args.text:
                text_file.write_text(default_text())
            text = text_file.read_text()
            print(f"KLD agreement on {text_file if args.text else 'the built-in suite text'} (c={args.ctx}); "
                  f"target within 10 % relative")
            for test in args.test:
                ours_kld, ours_top1, n = edgequant_kld(args.ref, test, text, args.ctx, args.threads)
                ref_kld, ref_top1 = perplexity_kld(args.ref, test, text_file, args.ctx, args.threads)
                dk = abs(ours_kld - ref_kld) / ref_kld if ref_kld else float("inf")
                dt = abs(ours_top1 - ref_top1) / ref_top1 if ref_top1 else float("inf")
                print(f"  {test.name}: positions {n}")
                print(f"    mean KLD   edgequant {ours_kld:.5f}  llama-perplexity {ref_kld:.5f}  "
                      f"diff {dk * 100:5.1f} %  {'PASS' if dk <= 0.10 else 'FAIL'}")
                print(f"    top-1      edgequant {ours_top1:.4f}  llama-perplexity {ref_top1:.4f}  "
                      f"diff {dt * 100:5.1f} %  {'PASS' if dt <= 0.10 else 'FAIL'}")
    if args.db and args.run:
        throughput(args.db, args.run)
    if not ((args.ref and args.test) or (args.db and args.run)):
        ap.error("give --ref and --test, or --db and --run")


if __name__ == "__main__":
    main()
