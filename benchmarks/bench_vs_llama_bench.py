"""Cross-check edgequant's host benchmark against llama.cpp's own llama-bench.

Run by hand; it prints figures and always exits 0 (it reports, it does not gate)::

    .venv/bin/python benchmarks/bench_vs_llama_bench.py --gguf model.gguf --threads 2 -p 512 -n 128 -r 5

llama-bench is built (once, cached) from the llama.cpp source vendored in the
installed llama-cpp-python, so both sides run the same kernels.  For each file,
edgequant's ``measure_gguf`` runs first and llama-bench second with the same
threads, prompt/generation lengths, repetitions, batch sizes, flash-attention
mode, load mode and repack setting; then one row per test compares the means.
Targets: pp within +/-10 %, tg within +/-5 % (ratio = edgequant / llama-bench).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgequant.bench.host import BenchError, HostBenchResult, measure_gguf
from edgequant.bench.llamacpp_tools import build_llama_tool
from edgequant.bench.stats import Summary
from edgequant.errors import EdgequantError
from edgequant.profiles import FLASH_ATTN, BenchSettings

TOLERANCE = {"pp": 0.10, "tg": 0.05}


@dataclass(frozen=True)
class Row:
    file: str
    test: str
    reference_mean: float
    reference_sd: float
    ours: Summary

    @property
    def ratio(self) -> float:
        return self.ours.mean / self.reference_mean

    @property
    def passed(self) -> bool:
        return abs(self.ratio - 1.0) <= TOLERANCE[self.test]


def run_llama_bench(binary: Path, gguf: Path, settings: BenchSettings, repack: bool,
                    timeout: float) -> dict[str, dict]:
    """Run llama-bench with the same settings; returns its JSON rows keyed 'pp' and 'tg'."""
    cmd = [str(binary), "-m", str(gguf), "-p", str(settings.n_prompt), "-n", str(settings.n_gen),
           "-t", str(settings.resolved_threads()), "-r", str(settings.repetitions),
           "-b", str(settings.n_batch), "-ub", str(settings.n_ubatch), "-fa", settings.flash_attn,
           "-lm", "mmap" if settings.mmap else "none", "--repack", "1" if repack else "0",
           "-o", "json"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
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


def compare(binary: Path, gguf: Path, settings: BenchSettings, repack: bool | None) -> list[Row]:
    print(f"edgequant: measuring {gguf.name}", file=sys.stderr)
    ours: HostBenchResult = measure_gguf(gguf, settings, on_progress=lambda p: print(f"  {p}", file=sys.stderr),
                                         repack=repack)
    print(f"llama-bench: measuring {gguf.name} (repack={int(ours.repack)})", file=sys.stderr)
    ref = run_llama_bench(binary, gguf, settings, ours.repack, timeout=settings.timeout)
    return [Row(gguf.name, "pp", ref["pp"]["avg_ts"], ref["pp"]["stddev_ts"], ours.pp),
            Row(gguf.name, "tg", ref["tg"]["avg_ts"], ref["tg"]["stddev_ts"], ours.tg)]


def render(rows: list[Row], settings: BenchSettings) -> Table:
    p, n = settings.n_prompt, settings.n_gen
    table = Table(title=f"edgequant vs llama-bench (t={settings.resolved_threads()}, "
                        f"r={settings.repetitions}, fa={settings.flash_attn})")
    for col in ("file", "test", "llama-bench t/s", "edgequant t/s", "ratio", "target", "result"):
        table.add_column(col, justify="left" if col in ("file", "test") else "right")
    for r in rows:
        name = f"pp{p}" if r.test == "pp" else f"tg{n}"
        table.add_row(r.file, name, f"{r.reference_mean:.2f} ± {r.reference_sd:.2f}",
                      f"{r.ours.mean:.2f} ± {r.ours.stddev:.2f}", f"{r.ratio:.3f}",
                      f"±{TOLERANCE[r.test]:.0%}", "PASS" if r.passed else "FAIL")
    return table


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
    ap.add_argument("--repack", choices=("auto", "0", "1"), default="auto",
                    help="extra weight buffers; auto = edgequant's choice, then the same for llama-bench")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per side per file")
    args = ap.parse_args(argv)

    settings = BenchSettings(threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                             repetitions=args.repetitions, warmup=1, n_batch=args.batch_size,
                             n_ubatch=args.ubatch_size, flash_attn=args.flash_attn, mmap=True,
                             timeout=args.timeout)
    repack = None if args.repack == "auto" else args.repack == "1"
    console = Console()
    try:
        binary = build_llama_tool("llama-bench", on_progress=lambda m: print(m, file=sys.stderr))
    except EdgequantError as exc:
        console.print(f"cannot build llama-bench: {exc}")
        return 0
    rows: list[Row] = []
    for gguf in args.gguf:
        try:
            rows += compare(binary, gguf, settings, repack)
        except (BenchError, EdgequantError, subprocess.TimeoutExpired) as exc:
            console.print(f"[red]{gguf}: {exc}[/red]")
    if rows:
        console.print(render(rows, settings))
        failed = [f"{r.file} {r.test}" for r in rows if not r.passed]
        console.print(f"{len(rows) - len(failed)}/{len(rows)} within tolerance"
                      + (f"; outside: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
