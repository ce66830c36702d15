#!/usr/bin/env python
"""Eval time over a ladder: plain generation against the wide route and speculative verification, printed
(run by hand; not a test).

The eval makes every rung's greedy outputs on the suite and scores its token-level divergence from the
reference (the KLD teacher pass).  Plain: one generation per rung, then the teacher pass.  Speculative
(``bench.eval_spec``): the teacher pass alone, taking each rung's output from it up to the first position
where the rung departs from the reference's output, and decoding token by token only from there.
Wide (``--route wide``, the default): plain generation with every case of a format side by side
(``quality.wide_slots``, or ``--slots N``) instead of EVAL_SLOTS, the reference's outputs included; each
output is compared with plain generation's, byte for byte, and the cases that differ are counted.
Both start from the reference's own outputs (generated once, timed apart).  With ``--check`` (on by default)
the speculative outputs are compared with the plain ones, case by case.

Prints, per rung: plain generation time, the speculative pass's decode time for that rung, how many cases
took the fast path (whole output from the batched pass), departed, or met a near tie, and how many differ
from plain generation; then the totals (reference + rungs + teacher pass) of both, mean and spread over
``--repeat`` repetitions.  Target (issue 19): the built-in suite over the default ladder of the 270M in
under 8 minutes on 2 cores, with no case differing from plain generation.

Figures are only meaningful on a quiet machine: the script prints the load average before and after.

Usage:
    .venv/bin/python benchmarks/eval_speed.py                       # default model, default ladder, whole suite
    .venv/bin/python benchmarks/eval_speed.py --limit 2 --rungs Q8_0,Q4_0 --repeat 1   # a quick look
    .venv/bin/python benchmarks/eval_speed.py --model CHECKPOINT --profile quick --limit 3
    .venv/bin/python benchmarks/eval_speed.py --route speculative   # the speculative route (as before)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


class _Quiet:
    def step(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr)

    def bytes_progress(self, task, done, total) -> None:
        pass

    def rung_started(self, quant) -> None:
        pass

    def rung_phase(self, quant, phase) -> None:
        pass

    def rung_done(self, quant, status) -> None:
        pass


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    return (f"{statistics.mean(values):.1f} s ± {statistics.stdev(values):.1f} "
            f"(min {min(values):.1f}, max {max(values):.1f}, n={len(values)})")


MARGINS = (0.02, 0.05, 0.1, 0.25, 0.5)


def wide_repetition(artifacts, suite, threads: int, prompting: str, timeout: float, slots: int, ref):
    """Times of plain generation and of the wide route (``slots`` cases side by side) for the reference and
    every rung, with the cases whose outputs differ (``quality.compare_generations``); the teacher pass is the
    same in both routes and timed once."""
    from edgequant.bench import quality

    out: dict = {"rungs": {}}
    for art in artifacts:
        row = out["rungs"].setdefault(art.quant, {})
        t0 = time.perf_counter()
        plain_data = quality.generate_rung(art.path, suite, ref, threads, None, timeout, lambda p: None)
        row["plain"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wide_data = quality.generate_rung(art.path, suite, ref, threads, None, timeout, lambda p: None, slots=slots)
        row["wide"] = time.perf_counter() - t0
        row["diffs"] = quality.compare_generations(wide_data, plain_data)
        row["gen_tokens"] = plain_data["gen_tokens"]
        print(f"  {art.quant}: plain {row['plain']:.1f} s, wide {row['wide']:.1f} s, "
              f"{len(row['diffs'])} cases differ", file=sys.stderr)
    groups = quality.teacher_groups_for((artifacts[0].path, artifacts[0].size_bytes),
                                        [(a.path, a.path, a.size_bytes) for a in artifacts[1:]], suite)
    t0 = time.perf_counter()
    for group in groups:
        quality.teacher_pass(ref, group, suite, threads, None, timeout, lambda p: None)
    out["teacher"] = time.perf_counter() - t0
    return out


def print_wide(artifacts, suite, reps, slots: int) -> None:
    print(f"\n{'rung':<10} {'gen tokens':>10} {'plain (8 slots)':>22} {f'wide ({slots} slots)':>22} {'differ':>7}")
    for art in artifacts:
        rows = [r["rungs"][art.quant] for r in reps]
        print(f"{art.quant:<10} {rows[-1]['gen_tokens']:>10} {_spread([r['plain'] for r in rows]):>22} "
              f"{_spread([r['wide'] for r in rows]):>22} {len(rows[-1]['diffs']):>7}")
        for d in rows[-1]["diffs"][:10]:
            print(f"    differs: {d.case_id} at token {d.position}: plain token {d.plain}, wide {d.speculative}")
    teacher = [r["teacher"] for r in reps]
    plain = [sum(x["plain"] for x in r["rungs"].values()) + r["teacher"] for r in reps]
    wide = [sum(x["wide"] for x in r["rungs"].values()) + r["teacher"] for r in reps]
    print(f"\nteacher pass (the same in both): {_spread(teacher)}")
    print(f"plain: reference + rungs' generation + teacher pass, total {_spread(plain)}")
    print(f"wide:  reference + rungs' generation + teacher pass, total {_spread(wide)}")
    n_diff = sum(len(x["diffs"]) for x in reps[-1]["rungs"].values())
    print(f"cases differing from plain generation: {n_diff} (of {len(suite.cases)} per rung, "
          f"{len(artifacts)} rungs with the reference)")


def one_repetition(artifacts, suite, threads: int, prompting: str, check: bool, plain: bool, timeout: float,
                   tie_margin: float | None):
    """Times of one eval of ``artifacts`` (reference first) both ways, and the per-rung comparison."""
    from edgequant.bench import quality

    ref_art, rungs = artifacts[0], artifacts[1:]
    out: dict = {"rungs": {}}
    with tempfile.TemporaryDirectory() as tmp:     # no cached reference: its generation is part of an eval
        t0 = time.perf_counter()
        ref = quality.reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, Path(tmp), threads,
                                        None, prompting, timeout, lambda p: None)
        out["reference"] = time.perf_counter() - t0
    groups = quality.teacher_groups_for((ref_art.path, ref_art.size_bytes),
                                        [(a.path, a.path, a.size_bytes) for a in rungs], suite, generating=True)
    by_path = {a.path: a for a in rungs}
    plain_data = {}
    if plain or check:
        for art in rungs:
            t0 = time.perf_counter()
            plain_data[art.path] = quality.generate_rung(art.path, suite, ref, threads, None, timeout, lambda p: None)
            out["rungs"].setdefault(art.quant, {})["plain"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for group in groups:
            quality.teacher_pass(ref, group, suite, threads, None, timeout, lambda p: None)
        out["plain_teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for group in groups:
        _, made = quality.teacher_pass(ref, group, suite, threads, None, timeout, lambda p: None,
                                       generate=True, margins=check, tie_margin=tie_margin)
        for path, data in made.items():
            row = out["rungs"].setdefault(by_path[path].quant, {})
            row["spec_decode"] = data["gen_seconds"]
            row["fast"] = data["speculative"]
            if check:
                row["diffs"] = quality.compare_generations(data, plain_data[path])
                # the batched pass's top-2 margins at the positions it decided (up to the departure)
                row["margins"] = [m for c in data["cases"]
                                  for m in c["spec"]["margins"][:c["spec"]["agreed"] + 1]]
    out["spec_teacher"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    ap.add_argument("--profile", default="default", help="profile whose ladder is evaluated")
    ap.add_argument("--suite", default="triage")
    ap.add_argument("--limit", type=int, default=None, help="the first N cases of each format")
    ap.add_argument("--rungs", default=None, help="comma-separated quants to evaluate (default: the whole ladder)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompting", default="auto")
    ap.add_argument("--no-check", action="store_true", help="do not compare with plain generation")
    ap.add_argument("--no-plain", action="store_true", help="time the speculative path only (implies --no-check)")
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--route", choices=("wide", "speculative"), default="wide",
                    help="the route timed against plain generation (default: wide)")
    ap.add_argument("--slots", type=int, default=None,
                    help="cases side by side in the wide route (default: every case of the largest format)")
    ap.add_argument("--tie-margin", type=float, default=None,
                    help="top-2 logit margin under which plain decoding decides (default: bench.eval_spec's)")
    args = ap.parse_args()

    from edgequant.pipeline import prepare
    from edgequant.core.paths import cache_dir
    from edgequant.profiles import load_profile
    from edgequant.profiles.suites import load_suite

    check = not (args.no_check or args.no_plain)
    plain = not args.no_plain
    cache = cache_dir()
    reporter = _Quiet()
    profile = load_profile(args.profile)
    resolved = prepare.resolve_model(args.model, cache, reporter)
    artifacts = prepare.build_ladder(resolved, profile, cache, reporter)
    if args.rungs:
        wanted = {q.strip() for q in args.rungs.split(",")}
        artifacts = [a for a in artifacts if a.is_reference or a.quant in wanted]
    artifacts.sort(key=lambda a: not a.is_reference)
    suite = load_suite(args.suite)
    if args.limit:
        suite = suite.limited(args.limit)
    print(f"model {resolved.checkpoint.model_id}, rungs {', '.join(a.quant for a in artifacts)} "
          f"(reference {artifacts[0].quant}), suite {suite.name}: {len(suite.cases)} cases, "
          f"{args.threads} threads, load average before {os.getloadavg()[0]:.2f}")
    if args.route == "wide":
        from edgequant.bench import quality

        slots = args.slots or quality.wide_slots(suite)
        with tempfile.TemporaryDirectory() as tmp:     # the reference's outputs: the teacher pass's draft
            ref_art = artifacts[0]
            ref = quality.reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, Path(tmp),
                                            args.threads, None, args.prompting, args.timeout, lambda p: None)
        reps = [wide_repetition(artifacts, suite, args.threads, args.prompting, args.timeout, slots, ref)
                for _ in range(args.repeat)]
        print_wide(artifacts, suite, reps, slots)
        print(f"load average after {os.getloadavg()[0]:.2f} (figures need a quiet machine)")
        return 0
    reps = [one_repetition(artifacts, suite, args.threads, args.prompting, check, plain, args.timeout,
                           args.tie_margin)
            for _ in range(args.repeat)]

    print(f"\n{'rung':<10} {'plain gen':>18} {'spec decode':>18} {'fast':>6} {'departed':>9} {'near tie':>9} "
          f"{'1-by-1 tok':>11} {'differ':>7}")
    for art in artifacts[1:]:
        rows = [r["rungs"].get(art.quant, {}) for r in reps]
        fast = rows[-1].get("fast", {})
        plain_t = _spread([r["plain"] for r in rows]) if plain else "-"
        spec_t = _spread([r["spec_decode"] for r in rows])
        differ = str(len(rows[-1]["diffs"])) if check else "-"
        print(f"{art.quant:<10} {plain_t:>18} {spec_t:>18} {fast.get('agrees', 0):>3}/{fast.get('cases', 0):<2} "
              f"{fast.get('departs', 0):>9} {fast.get('near_tie', 0):>9} {fast.get('single_tokens', 0):>11} "
              f"{differ:>7}")
        for d in rows[-1].get("diffs", [])[:10]:
            print(f"    differs: {d.line()}: plain token {d.plain}, speculative {d.speculative}")
        if rows[-1].get("margins"):
            m = rows[-1]["margins"]
            print("    positions of the batched pass with a top-2 margin under " +
                  ", ".join(f"{t:g}: {sum(x < t for x in m)}" for t in MARGINS) + f" (of {len(m)})")
    ref_t = [r["reference"] for r in reps]
    print(f"\nreference outputs ({artifacts[0].quant}): {_spread(ref_t)}")
    if plain:
        totals = [r["reference"] + sum(x["plain"] for x in r["rungs"].values()) + r["plain_teacher"] for r in reps]
        print(f"plain:       rungs' generation + teacher pass {_spread([r['plain_teacher'] for r in reps])}; "
              f"total {_spread(totals)}")
    spec_totals = [r["reference"] + r["spec_teacher"] for r in reps]
    print(f"speculative: teacher pass with generation {_spread([r['spec_teacher'] for r in reps])}; "
          f"total {_spread(spec_totals)}")
    if check:
        n_diff = sum(len(x["diffs"]) for x in reps[-1]["rungs"].values())
        print(f"cases differing from plain generation: {n_diff} (of {len(suite.cases)} per rung)")
    print(f"load average after {os.getloadavg()[0]:.2f} (figures need a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
