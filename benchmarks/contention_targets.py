"""The three targets of issue 17 (speed figures that say when they cannot be trusted), printed, not timed.

On this machine (run it when nothing else runs: it starts its own CPU hog where it needs one):

0. **This host's A/A noise floor first**, of every measured rung (``--floor-repeat`` fresh measurements each,
   stored as ``edgequant noise --rung Q`` stores it), so that ``compare`` below judges as a user's would
   after running ``edgequant noise``.
1. **Hog during part of a ladder run.**  A quiet ladder run first; then a ladder run during which one
   CPU-burning process per CPU starts when the second rung starts and stops ``--hog-seconds`` later.
   Every rung measured while the hog ran must end re-measured clean or stored ``noisy``: no rung's stored
   tg may differ from the quiet run's by more than 10 % without being marked.
2. **A/A comparisons.**  ``--aa`` more quiet runs of the same artifacts, each compared with the one before:
   no false regression (a drop within the floor is inconclusive, counted and shown, not a regression).  And
   the quiet run compared with the hog run: the contended rungs come out noisy (not judged), not as
   regressions.
3. **An injected slowdown.**  A run in which one rung (``--slow-rung``) is measured with one thread
   instead of the profile's (its rows still say the profile's threads, as a slower build would):
   ``compare`` must flag that rung (a regression, or inconclusive within the floor: either sends it to the
   re-check), and ``compare --recheck`` (baseline and candidate artifacts measured alternately, the
   candidate's side again with one thread) must confirm it.

    .venv/bin/python benchmarks/contention_targets.py                       # quick profile, the default model
    .venv/bin/python benchmarks/contention_targets.py --quick               # fewer rungs and comparisons
    .venv/bin/python benchmarks/contention_targets.py --aa 2 -p 64 -n 16 --hog-seconds 8 \
        --contention-wait 5 --contention-retries 1 --rounds 3 --floor-repeat 3           # a reduced check

The full check (4 rungs, 5 floor measurements each, 10 A/A comparisons, 5 re-check rounds) takes about
10 minutes on 2 cores with the default model.  ``--quick`` checks the same targets on fewer rungs
(``QUICK_RUNGS``: the reference, one 8-bit rung and the slowed rung), with ``QUICK_AA`` A/A comparisons and
``QUICK_ROUNDS`` re-check rounds; it prints what it reduced, and both print how long they took.  An option
given explicitly wins over the preset.  Every target prints its figures and their spread (the coefficient
of variation of each stored tg, the range of the A/A runs' medians).

Everything goes to a temporary results database (``--db`` to keep one); artifacts come from the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path


QUICK_RUNGS = ("BF16", "Q8_0", "Q4_0")
QUICK_AA = 3
QUICK_ROUNDS = 3
FULL_AA, FULL_ROUNDS = 10, 5
FLOOR_REPEAT = 5


class Hog:
    """One CPU-burning process per CPU, started and stopped on demand."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.spans: list[tuple[float, float]] = []

    def start(self) -> None:
        if not self.procs:
            self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                          for _ in range(os.cpu_count() or 2)]
            self.spans.append((time.monotonic(), float("inf")))

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        if self.procs:
            self.spans[-1] = (self.spans[-1][0], time.monotonic())
        self.procs = []


class HogReporter:
    """Starts the hog when the ``start_at``-th rung starts; a timer stops it ``seconds`` later.
    Remembers when each rung started and finished."""

    def __init__(self, hog: Hog, start_at: int, seconds: float):
        self.hog, self.start_at, self.seconds = hog, start_at, seconds
        self.n = 0
        self.times: dict[str, list[float]] = {}

    def step(self, message): pass
    def bytes_progress(self, task, done, total): pass
    def rung_phase(self, quant, phase): pass

    def rung_started(self, quant):
        self.times[quant] = [time.monotonic(), float("inf")]
        if self.n == self.start_at:
            self.hog.start()
            threading.Timer(self.seconds, self.hog.stop).start()
        self.n += 1

    def rung_done(self, quant, status):
        self.times[quant][1] = time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded Gemma 3 270M)")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("-p", "--n-prompt", type=int, default=None)
    ap.add_argument("-n", "--n-gen", type=int, default=None)
    ap.add_argument("--aa", type=int, default=None, help=f"A/A comparisons (quiet runs after the first; "
                                                          f"default {FULL_AA}, --quick {QUICK_AA})")
    ap.add_argument("--hog-seconds", type=float, default=20.0)
    ap.add_argument("--slow-rung", default="Q4_0")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"re-check rounds (default {FULL_ROUNDS}, --quick {QUICK_ROUNDS})")
    ap.add_argument("--floor-repeat", type=int, default=FLOOR_REPEAT,
                    help="measurements of each rung for this host's A/A noise floor, stored first (as "
                         "`edgequant noise --rung Q` stores it); 0: no floor, compare judges on the gates alone")
    ap.add_argument("--rungs", default=None, metavar="Q,Q,...",
                    help="measure only these rungs of the profile (default: all; --quick: " + ",".join(QUICK_RUNGS) + ")")
    ap.add_argument("--quick", action="store_true",
                    help="the same three targets in about 15-20 minutes: fewer rungs, A/A comparisons and rounds")
    ap.add_argument("--contention-wait", type=float, default=None, help="override the profile's (seconds)")
    ap.add_argument("--contention-retries", type=int, default=None, help="override the profile's")
    ap.add_argument("--db", default=None)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    started = time.monotonic()
    reduced = []
    if args.quick:
        for name, value, full in (("rungs", ",".join(QUICK_RUNGS), "all of the profile's"),
                                  ("aa", QUICK_AA, FULL_AA), ("rounds", QUICK_ROUNDS, FULL_ROUNDS)):
            if getattr(args, name) is None:
                setattr(args, name, value)
                reduced.append(f"--{name} {value} (full: {full})")
    args.aa = FULL_AA if args.aa is None else args.aa
    args.rounds = FULL_ROUNDS if args.rounds is None else args.rounds
    from edgequant.core.errors import EdgequantError
    from edgequant.pipeline.registry import place_class
    from edgequant.noise import MIN_ROUNDS, rounds_too_few

    if args.rounds < MIN_ROUNDS:
        print(rounds_too_few(args.rounds))
        return 2
    if args.floor_repeat == 1:
        print("--floor-repeat 1: a noise floor needs at least 2 measurements of each rung (0: no floor)")
        return 2

    from edgequant import noise
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.bench.host import measure_gguf
    from edgequant.core.paths import cache_dir
    from edgequant.profiles import load_profile, with_bench_overrides
    from edgequant.results.compare import compare_runs
    from edgequant.results.gates import load_gates
    from edgequant.results.store import Store

    profile = with_bench_overrides(load_profile(args.profile), n_prompt=args.n_prompt, n_gen=args.n_gen,
                                   contention_wait=args.contention_wait, contention_retries=args.contention_retries)
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir()
    tmp = tempfile.mkdtemp(prefix="eq-contention-")
    store = Store(args.db or str(Path(tmp) / "results.db"))
    gates = load_gates("gates")
    quiet_reporter = NullReporter()
    resolved = prepare.resolve_model(args.model, cache, quiet_reporter)
    artifacts = prepare.build_ladder(resolved, profile, cache, quiet_reporter)
    model_id, mh = resolved.checkpoint.model_id, resolved.model_hash
    if args.rungs:
        wanted = [q.strip().upper() for q in args.rungs.split(",") if q.strip()]
        unknown = [q for q in wanted if q not in {a.quant.upper() for a in artifacts}]
        if unknown:
            print(f"--rungs: {', '.join(unknown)} not rung(s) of profile {profile.name} "
                  f"({', '.join(a.quant for a in artifacts)})")
            return 2
        artifacts = [a for a in artifacts if a.quant.upper() in wanted]
    quants = [a.quant for a in artifacts]
    if args.slow_rung not in quants:
        print(f"--slow-rung {args.slow_rung} is not among the measured rungs ({', '.join(quants)})")
        return 2
    if reduced:
        print("--quick: " + "; ".join(reduced) + ". The targets are the same; fewer A/A comparisons find a "
              "rare false regression less often: run the full check before relying on target 2")
    print(f"profile {profile.name}: {', '.join(quants)}; pp{profile.bench.n_prompt} tg{profile.bench.n_gen}, "
          f"{profile.bench.repetitions} reps, threads {profile.bench.resolved_threads()}; contention threshold "
          f"{profile.bench.contention_threshold:g} cores, {profile.bench.contention_retries} retries, "
          f"wait {profile.bench.contention_wait:g} s; store {store.path}")

    def ladder(label: str, reporter=quiet_reporter, measure=None) -> str:
        run = store.start_run(f"contention_targets {label}", profile.name, model_id, mh)
        pipeline.bench_rungs(RunScope(store, run, model_id, mh, reporter), artifacts, profile, measure=measure)
        store.finish_run(run, "complete")
        return run

    def figures(run: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in store.measurements(run):
            out.setdefault(r["quant"], {})[r["metric"]] = r
        for s in store.rung_statuses(run):
            out.setdefault(s["quant"], {})["status"] = s["status"]
        return out

    def cv(fig: dict) -> str:
        """The stored tg's coefficient of variation over its repetitions, in %."""
        value = ((fig.get("tg_tps") or {}).get("detail") or {}).get("cv")
        return f"{100 * value:.1f}%" if value is not None else "—"

    # ---- this host's A/A noise floor of each rung, as `edgequant noise --rung Q --repeat N` stores it
    if args.floor_repeat:
        place = place_class("host")()
        print(f"\nA/A noise floor of {place.device_id} ({args.floor_repeat} measurements of each rung; the drop "
              f"two single runs show by chance: max(range, 3.09 * sqrt(2) * sd of the medians)):")
        for art in artifacts:
            try:
                floor = noise.measure_noise_floor(art, profile.bench, args.floor_repeat, place=place)
            except EdgequantError as exc:       # still contended after the retries: nothing to judge against
                print(f"  {art.quant}: {exc}")
                return 1
            store.record_artifact(art.record())
            store.record_noise_floor(floor.device_id, art.quant, art.sha256, floor.params, floor.floors)
            for metric, (pct, medians) in floor.floors.items():
                cv_pct = 100 * statistics.stdev(medians) / statistics.median(medians)
                print(f"  {art.quant:<10} {metric}: floor {pct:5.1f} %  (CV {cv_pct:4.1f} %; medians "
                      f"{', '.join(f'{m:.1f}' for m in medians)})")
    else:
        print("\n--floor-repeat 0: no A/A noise floor; compare judges on the gates' percentage alone")

    # ---- target 1
    quiet = ladder("quiet-0")
    hog = Hog()
    rep = HogReporter(hog, start_at=1, seconds=args.hog_seconds)
    try:
        hogged = ladder("hog", rep)
    finally:
        hog.stop()
    q, h = figures(quiet), figures(hogged)
    print("\nTARGET 1: CPU hog during part of a ladder run "
          f"(hog from rung 2 for {args.hog_seconds:g} s)")
    print(f"  {'rung':<10} {'quiet tg (cv)':>16} {'hog-run tg (cv)':>16} {'diff':>8}  {'status':<7} "
          f"{'marked':<6} attempts (other cores)  hog overlapped")
    t1_ok = True
    for quant in quants:
        if "tg_tps" not in q.get(quant, {}) or "tg_tps" not in h.get(quant, {}):
            t1_ok = False
            print(f"  {quant:<10} no stored tg (quiet: {q.get(quant, {}).get('status')}, hog run: "
                  f"{h.get(quant, {}).get('status')})   <-- not measured")
            continue
        tq, th = q[quant]["tg_tps"]["value"], h[quant]["tg_tps"]["value"]
        status = h[quant].get("status", "ok")
        attempts = h[quant].get("contention", {}).get("detail", {}).get("attempts", [])
        start, end = rep.times[quant]
        overlapped = any(a < end and b > start for a, b in hog.spans)
        diff = 100 * (th - tq) / tq
        marked = status == "noisy"
        unmarked_wrong = not marked and abs(diff) > 10
        t1_ok &= not unmarked_wrong
        print(f"  {quant:<10} {tq:9.1f} ({cv(q[quant]):>4}) {th:9.1f} ({cv(h[quant]):>4}) {diff:+7.1f}%  "
              f"{status:<7} {'yes' if marked else 'no':<6} {', '.join(f'{a:.2f}' for a in attempts):<22}  "
              f"{'yes' if overlapped else 'no'}" + ("   <-- off by >10 % and not marked" if unmarked_wrong else ""))
    print(f"  => {'PASS' if t1_ok else 'FAIL'}: every rung within 10 % of the quiet run or marked noisy")
    not_quiet = [quant for quant in quants if q.get(quant, {}).get("status") == "noisy"]
    if not_quiet:
        print(f"  (the quiet run was not quiet: {', '.join(not_quiet)} stored noisy there, so the comparison "
              f"above has no clean reference; run this script when nothing else runs)")

    # ---- target 2
    runs = [quiet]
    for i in range(args.aa):
        runs.append(ladder(f"quiet-{i + 1}"))
    false, other, unsure = [], [], []
    for a, b in zip(runs, runs[1:]):
        cmp = compare_runs(store, a, b, gates)
        false += [f"{r.quant} {r.gate}: {r.message}" for r in cmp.regressions if r.gate.startswith("speed:")]
        other += [f"{r.quant} {r.gate}: {r.message}" for r in cmp.regressions if not r.gate.startswith("speed:")]
        unsure += [f"{r.quant} {r.gate}: {r.message}" for r in cmp.inconclusive]
    print(f"\nTARGET 2: {args.aa} A/A comparisons of quiet runs of the same artifacts: "
          f"{len(false)} false speed regression(s), {len(other)} other regression(s); {len(unsure)} speed "
          f"gate(s) inconclusive (within the noise floor: `compare --recheck` would decide; not a regression)")
    for line in false + other:
        print(f"  REGRESSION {line}")
    for line in unsure:
        print(f"  inconclusive {line}")
    print(f"  spread of the {len(runs)} quiet runs' stored tg (min .. max, (max - min) / median, noisy runs):")
    quiet_figs = [figures(r) for r in runs]
    for quant in quants:
        tgs = [f[quant]["tg_tps"]["value"] for f in quiet_figs if "tg_tps" in f.get(quant, {})]
        marked = sum(1 for f in quiet_figs if f.get(quant, {}).get("status") == "noisy")
        if tgs:
            mid = statistics.median(tgs)
            print(f"    {quant:<10} {min(tgs):9.1f} .. {max(tgs):9.1f} t/s  {100 * (max(tgs) - min(tgs)) / mid:5.1f} %  "
                  f"({marked} of {len(runs)} noisy)")
    cmp = compare_runs(store, quiet, hogged, gates)
    speed_fail = [r for r in cmp.regressions if r.gate.startswith("speed:")]
    noisy_skips = [r for r in cmp.results if r.gate.startswith("speed:") and r.status == "skip"
                   and "noisy" in r.message]
    print(f"  quiet vs hog run: {len(speed_fail)} speed regression(s), {len(noisy_skips)} speed gate(s) not judged "
          f"because noisy ({', '.join(sorted({r.quant for r in noisy_skips})) or 'none'})")
    for r in speed_fail:
        print(f"    REGRESSION {r.quant} {r.gate}: {r.message}")
    t2_ok = not false and not other and not speed_fail
    print(f"  => {'PASS' if t2_ok else 'FAIL'}")

    # ---- target 3
    def one_thread(quant):
        def measure(path, settings, **kw):
            if Path(path).name == slow_path.name:
                settings = replace(settings, threads=1)
            return measure_gguf(path, settings, **kw)
        return measure

    slow_path = next(a.path for a in artifacts if a.quant == args.slow_rung)
    slowed = ladder("slowdown", measure=one_thread(args.slow_rung))
    cmp = compare_runs(store, runs[-1], slowed, gates)
    flagged = {(r.quant, r.gate): r for r in cmp.results
               if r.gate.startswith("speed:") and r.status in ("fail", "inconclusive")}
    print(f"\nTARGET 3: {args.slow_rung} measured with 1 thread instead of "
          f"{profile.bench.resolved_threads()} (rows unchanged)")
    before, after = figures(runs[-1]).get(args.slow_rung, {}), figures(slowed).get(args.slow_rung, {})
    if "tg_tps" in before and "tg_tps" in after:
        tb, ta = before["tg_tps"]["value"], after["tg_tps"]["value"]
        print(f"  stored tg of {args.slow_rung}: {tb:.1f} t/s (cv {cv(before)}) -> {ta:.1f} t/s (cv {cv(after)}), "
              f"{100 * (ta - tb) / tb:+.1f} % (status {after.get('status', 'ok')}); the target asks for a "
              f"slowdown of 15 % or more to be caught")
    for (quant, gate), r in sorted(flagged.items()):
        word = "REGRESSION" if r.status == "fail" else "INCONCLUSIVE (flagged for the re-check)"
        print(f"  compare: {word} {quant} {gate}: {r.message}")
    caught = any(quant == args.slow_rung for quant, _ in flagged)
    others = [k for k in flagged if k[0] != args.slow_rung]
    pairs = [p for p in cmp.pairs if p.quant == args.slow_rung and p.stage == "bench"]
    rechecks = noise.recheck(store, cmp, args.rounds, profile.bench, measure_candidate=one_thread(args.slow_rung),
                             pairs=pairs)
    for r in rechecks:
        word = {"fail": "CONFIRMED", "pass": "NOT CONFIRMED"}.get(r.status, "SKIP")
        print(f"  recheck: {word} {r.quant} speed:{r.metric}: {r.message}")
    confirmed = any(r.status == "fail" for r in rechecks)
    t3_ok = caught and confirmed and not others
    print(f"  => {'PASS' if t3_ok else 'FAIL'}: compare flagged {args.slow_rung}: {caught}; re-check confirmed: "
          f"{confirmed}; other rungs flagged: {len(others)}")
    store.close()
    floors = len(quants) * args.floor_repeat
    print(f"\n{floors} floor measurements, {len(runs) + 2} ladder runs of {len(quants)} rung(s) and "
          f"{2 * args.rounds} re-check measurements in "
          f"{(time.monotonic() - started) / 60:.1f} min")
    print("(figures measured on a busy machine mean nothing: re-run on a quiet one)")
    return 0 if t1_ok and t2_ok and t3_ok else 1


if __name__ == "__main__":
    sys.exit(main())
