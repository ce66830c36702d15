#!/usr/bin/env python
"""Where one rung's eval time goes, printed with the counts that explain it (run by hand; not a test).

Runs the eval worker's plain generation in this process on one GGUF, timing our own Session's calls:
import and model load, each format's shared prefix, each case's own prompt, the batched decode steps
(with the rows they carried), the per-token work in Python (argmax, piece, stop strings) and the
parsers; then the KLD pass's scoring of full-vocabulary logit rows, as a block of 64 rows and one row
at a time (``eval_teacher.score_rows``).  Counts: prompt tokens (prefix and case), generated tokens per
case, cases per format.  Times on a busy machine are not figures: read the shares and the counts.

Usage:
    .venv/bin/python benchmarks/eval_profile.py GGUF [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

T: dict[str, float] = collections.defaultdict(float)
N: collections.Counter = collections.Counter()


def timed(cls, name: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            T[name] += time.perf_counter() - t0
            N[name] += 1
    setattr(cls, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--suite", default="triage")
    ap.add_argument("--limit", type=int, default=None, help="the first N cases of each format")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import numpy as np

    from edgequant.bench import eval_worker as W
    from edgequant.bench import quality
    from edgequant.bench.eval_teacher import score_rows
    from edgequant.profiles.suites import load_suite

    T["import"] = time.perf_counter() - t0
    suite = load_suite(args.suite)
    if args.limit:
        suite = suite.limited(args.limit)
    req = quality.base_request(args.gguf, suite, args.threads, None, "auto")

    decode_entries = W.Session.decode_entries

    def counted(self, entries):
        t = time.perf_counter()
        decode_entries(self, entries)
        # one sequence with several tokens is a prompt (a format's prefix or a case's own text); else a step
        kind = "prompt" if len(entries) > 1 and len({e[2] for e in entries}) == 1 else "step"
        kind = "prefix" if kind == "prompt" and entries[0][2] == 0 else kind
        T[f"decode {kind}"] += time.perf_counter() - t
        N[f"decode {kind}"] += 1
        N[f"decode {kind} tokens"] += len(entries)
    W.Session.decode_entries = counted
    for name in ("ensure_context", "tokenize"):
        timed(W.Session, name)
    timed(W.Generator, "_step")

    t0 = time.perf_counter()
    import llama_cpp

    sess = W.Session(llama_cpp, req, W.WorkerLog(llama_cpp, echo=False))
    T["model load"] = time.perf_counter() - t0
    sess.close()
    t0 = time.perf_counter()
    res = W.run(req, lambda p: None)
    T["generation (whole)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = quality.case_results(suite, res)
    T["parse"] = time.perf_counter() - t0

    print(f"{args.gguf}: {len(suite.cases)} cases, {args.threads} threads, slots {res['slots']}")
    for name in sorted(T, key=lambda k: -T[k]):
        extra = f", {N[name + ' tokens']} tokens" if N[name + " tokens"] else ""
        print(f"  {name:<20} {T[name]:8.2f} s  ({N[name] or 1} calls{extra})")
    steps, rows = N["decode step"], N["decode step tokens"]
    if steps:
        print(f"  decode steps: {rows / steps:.1f} rows per step, {T['decode step'] / steps * 1000:.0f} ms per step")
    print("per format: cases, mean prompt tokens, mean / max generated tokens, how they stopped")
    for fmt in sorted({c.format for c in suite.cases}):
        mine = [r for cid, r in results.items() if r.case.format == fmt]
        n_prompt = [c["n_prompt"] for c in res["cases"] if results[c["id"]].case.format == fmt]
        gen = [len(r.tokens) for r in mine]
        print(f"  {fmt:<6} {len(mine):>3} cases, prompt {np.mean(n_prompt):6.0f}, generated {np.mean(gen):5.1f} / "
              f"{max(gen):>3}, {dict(collections.Counter(r.stopped for r in mine))}")

    # the KLD pass: scoring 64 full-vocabulary rows of a reference and one rung
    class Rows:
        def __init__(self, z):
            self.z = z

        def logits(self, i):
            return self.z[i]
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, sess.n_vocab), dtype=np.float32) * 3
    rung = ref + rng.standard_normal((64, sess.n_vocab), dtype=np.float32) * 0.3
    t0 = time.perf_counter()
    W.RefRows(ref).compare(rung, list(range(64)))
    block = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_rows(Rows(ref), [Rows(rung)], list(range(64)), list(range(64)), [([], [], [])], None)
    single = time.perf_counter() - t0
    print(f"KLD scoring of 64 rows x {sess.n_vocab} (reference + one rung): as one block {block:.2f} s, "
          f"one row at a time {single:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
