"""Cross-check edgequant's host benchmark against llama.cpp's own llama-bench.

Run by hand; it prints figures and always exits 0 (it reports, it does not gate)::

    .venv/bin/python benchmarks/bench_vs_llama_bench.py --gguf model.gguf --threads 2 -p 512 -n 128 -r 5

llama-bench is built (once, cached) from the llama.cpp source vendored in the
installed llama-cpp-python, so both sides run the same kernels.  Both get the
same threads, prompt/generation lengths, repetitions, batch sizes,
flash-attention mode, load mode (mmap) and repack setting.  Targets: pp within
+/-10 %, tg within +/-5 % (ratio = edgequant / llama-bench).

Shared machines are noisy, so every run also reports *contention*: the share of
the machine's CPUs that other work (other processes, hypervisor steal) used
while it ran (``/proc/stat`` minus the run's own CPU time).  With ``--rounds N`` the two sides alternate N times
(the order flips every round) and the verdict uses the median ratio, which
separates a difference of method from a neighbour's burst of load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from rich.console import Console
from rich.table import Table

from edgequant.bench.host import measure_gguf
from edgequant.core.errors import BenchError
from edgequant.bench.llamacpp_tools import build_llama_tool
from edgequant.core.errors import EdgequantError
from edgequant.profiles import FLASH_ATTN, REPACK, BenchSettings

TOLERANCE = {"pp": 0.10, "tg": 0.05}
T = TypeVar("T")


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all CPUs spent busy (user, nice, system, irq, softirq, steal) since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the measured runs)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_with_contention(fn: Callable[[], T]) -> tuple[T, float | None]:
    """Run ``fn``; return its value and the share of all CPUs used by *other* work meanwhile.

    Other work = busy CPU time of the whole machine (hypervisor steal
    included) minus the CPU time of this process and the run it waited for,
    divided by wall time x CPUs.  Our own threads waiting for a CPU do not count.
    """
    b0, o0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.monotonic()
    value = fn()
    b1, o1, t1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.monotonic()
    if b0 is None or b1 is None or t1 <= t0:
        return value, None
    others = (b1 - b0) - (o1 - o0)
    return value, max(0.0, others / ((t1 - t0) * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class Side:
    mean: float
    sd: float
    contention: float | None


@dataclass(frozen=True)
class Row:
    file: str
    test: str
    round: int
    reference: Side
    ours: Side

    @property
    def ratio(self) -> float:
        return self.ours.mean / self.reference.mean


def passed(test: str, ratio: float) -> bool:
    return abs(ratio - 1.0) <= TOLERANCE[test]


def run_llama_bench(binary: Path, gguf: Path, settings: BenchSettings, repack: bool) -> dict[str, dict]:
    """Run llama-bench with the same settings; returns its JSON rows keyed 'pp' and 'tg'."""
    cmd = [str(binary), "-m", str(gguf), "-p", str(settings.n_prompt), "-n", str(settings.n_gen),
           "-t", str(settings.resolved_threads()), "-r", str(settings.repetitions),
           "-b", str(settings.n_batch), "-ub", str(settings.n_ubatch), "-fa", settings.flash_attn,
           "-lm", "mmap" if settings.mmap else "none", "--repack", "1" if repack else "0",
           "-o", "json"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise EdgequantError(f"llama-bench exited with status {proc.returncode}: {tail}", exit_code=1)
    rows: dict[str, dict] = {}
    for rec in json.loads(proc.stdout):
        if rec["n_prompt"] > 0 and rec["n_gen"] == 0:
            rows["pp"] = rec
        elif rec["n_gen"] > 0 and rec["n_prompt"] == 0:
            rows["tg"] = rec
    return rows


def compare_once(binary: Path, gguf: Path, settings: BenchSettings, round_no: int) -> list[Row]:
    def ours_run():
        print(f"edgequant: {gguf.name} (round {round_no})", file=sys.stderr)
        return measure_gguf(gguf, settings, on_progress=lambda p: print(f"  {p}", file=sys.stderr))

    def ref_run():
        print(f"llama-bench: {gguf.name} (round {round_no})", file=sys.stderr)
        return run_llama_bench(binary, gguf, settings, settings.resolved_repack())

    if round_no % 2:  # alternate who goes first
        (ours, c_ours), (ref, c_ref) = timed_with_contention(ours_run), timed_with_contention(ref_run)
    else:
        (ref, c_ref), (ours, c_ours) = timed_with_contention(ref_run), timed_with_contention(ours_run)
    return [Row(gguf.name, test, round_no,
                Side(ref[test]["avg_ts"], ref[test]["stddev_ts"], c_ref),
                Side(summary.mean, summary.stddev, c_ours))
            for test, summary in (("pp", ours.pp), ("tg", ours.tg))]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def render(rows: list[Row], settings: BenchSettings) -> Table:
    p, n = settings.n_prompt, settings.n_gen
    table = Table(title=f"edgequant vs llama-bench (t={settings.resolved_threads()}, r={settings.repetitions}, "
                        f"fa={settings.flash_attn}, repack={int(settings.resolved_repack())})")
    for col in ("file", "test", "round", "llama-bench t/s", "edgequant t/s", "ratio", "target",
                "contention lb/eq", "result"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("file", "test") else "right")
    for r in rows:
        table.add_row(r.file, f"pp{p}" if r.test == "pp" else f"tg{n}", str(r.round),
                      f"{r.reference.mean:.2f} ± {r.reference.sd:.2f}", f"{r.ours.mean:.2f} ± {r.ours.sd:.2f}",
                      f"{r.ratio:.3f}", f"±{TOLERANCE[r.test]:.0%}",
                      f"{_pct(r.reference.contention)}/{_pct(r.ours.contention)}",
                      "PASS" if passed(r.test, r.ratio) else "FAIL")
    return table


def verdicts(rows: list[Row]) -> list[str]:
    """One line per (file, test): the median ratio over the rounds and PASS/FAIL."""
    out = []
    for key in dict.fromkeys((r.file, r.test) for r in rows):
        ratios = [r.ratio for r in rows if (r.file, r.test) == key]
        med = statistics.median(ratios)
        out.append(f"{key[0]} {key[1]}: median ratio {med:.3f} over {len(ratios)} round(s), "
                   f"target ±{TOLERANCE[key[1]]:.0%}: {'PASS' if passed(key[1], med) else 'FAIL'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, action="append", required=True, help="GGUF file (repeatable)")
    ap.add_argument("--threads", "-t", type=int, default=0, help="threads (default: physical cores)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-fa", "--flash-attn", choices=FLASH_ATTN, default="auto")
    ap.add_argument("--repack", choices=REPACK, default="auto",
                    help="weight repacking (llama-bench --repack); auto = off on AMX CPUs; both sides get the same")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = ap.parse_args(argv)

    settings = BenchSettings(threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                             repetitions=args.repetitions, warmup=1, n_batch=args.batch_size,
                             n_ubatch=args.ubatch_size, flash_attn=args.flash_attn, mmap=True,
                             repack=args.repack, timeout=args.timeout)
    console = Console(width=160)
    try:
        binary = build_llama_tool("llama-bench", on_progress=lambda m: print(m, file=sys.stderr))
    except EdgequantError as exc:
        console.print(f"cannot build llama-bench: {exc}")
        return 0
    rows: list[Row] = []
    for gguf in args.gguf:
        for round_no in range(1, args.rounds + 1):
            try:
                rows += compare_once(binary, gguf, settings, round_no)
            except (BenchError, EdgequantError, subprocess.TimeoutExpired) as exc:
                console.print(f"[red]{gguf}: {exc}[/red]")
    if rows:
        console.print(render(rows, settings))
        for line in verdicts(rows):
            console.print(line)
        console.print("contention = share of the CPUs used by other work during the run (lb = llama-bench, "
                      "eq = edgequant); rows with high contention measure the neighbours, not the method.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
