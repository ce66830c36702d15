"""Check the on-device runner against `edgequant bench` on this host.

Run by hand; it prints figures and always exits 0 (it reports, it does not gate)::

    .venv/bin/python benchmarks/runner_vs_bench.py --gguf model.gguf --threads 2 -p 512 -n 128 -r 5 --rounds 3

It builds (once, cached) the ``host`` runner, then measures each GGUF two ways
with the same settings: edgequant's host worker (``edgequant.bench.host.measure_gguf``,
what ``edgequant bench`` runs) and the runner's llama-bench driven exactly as on
a phone (``edgequant.bench.device_bench.run_device_bench``: the measuring shell
with ``toybox time -v`` and the /proc poller, JSON parsed from its output) through
a transport that runs ``/bin/sh`` on this machine.  Target: the runner's pp and
tg within +/-5 % of edgequant's (ratio = runner / edgequant, median over rounds).
Load time and memory are printed for information: they do not measure the same
thing (see ``edgequant.bench.device_bench``).

Every run also reports contention (the share of the CPUs other work used
meanwhile, as in ``bench_vs_llama_bench.py``); rounds alternate which side goes first.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench_vs_llama_bench import timed_with_contention  # this folder is on sys.path when run as a script
from edgequant.bench.device_bench import RemoteRunner, run_device_bench
from edgequant.bench.host import measure_gguf
from edgequant.core.errors import BenchError
from edgequant.bench.runner import build_runner
from edgequant.devices.transport import DeviceError, ShellResult
from edgequant.core.errors import EdgequantError
from edgequant.profiles import FLASH_ATTN, REPACK, BenchSettings

TOLERANCE = 0.05


class ThisMachine:
    """The Transport interface served by /bin/sh here: the host plays the device."""

    serial, kind = "localhost", "local"

    def shell(self, command: str, timeout: float) -> ShellResult:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeviceError("timeout", f"shell command did not finish within {timeout:g} s") from None
        return ShellResult(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def close(self) -> None:
        pass


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


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
    ap.add_argument("--repack", choices=REPACK, default="auto", help="both sides get the same (auto: off on AMX)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = ap.parse_args(argv)
    settings = BenchSettings(threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                             repetitions=args.repetitions, warmup=1, n_batch=args.batch_size,
                             n_ubatch=args.ubatch_size, flash_attn=args.flash_attn, mmap=True,
                             repack=args.repack, timeout=args.timeout)
    threads, repack = settings.resolved_threads(), settings.resolved_repack()
    console = Console(width=170)
    try:
        runner = build_runner("host", on_progress=lambda m: print(m, file=sys.stderr))
    except EdgequantError as exc:
        console.print(f"cannot build the host runner: {exc}")
        return 0
    remote = RemoteRunner.for_runner(runner, str(runner.path))
    table = Table(title=f"host runner (llama-bench, device path) vs edgequant bench (t={threads}, "
                        f"r={settings.repetitions}, fa={settings.flash_attn}, repack={int(repack)})")
    for col in ("file", "test", "round", "edgequant t/s", "runner t/s", "ratio", "contention eq/run", "result"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("file", "test") else "right")
    info = Table(title="for information: load and memory (not the same quantities, see device_bench)")
    for col in ("file", "round", "load s eq/run", "peak RSS MiB eq/run", "anon MiB eq/run", "file MiB eq/run"):
        info.add_column(col, no_wrap=True, justify="left" if col == "file" else "right")
    ratios: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="runner-vs-bench-") as work:
        for gguf in args.gguf:
            for round_no in range(1, args.rounds + 1):
                def ours():
                    print(f"edgequant: {gguf.name} (round {round_no})", file=sys.stderr)
                    return measure_gguf(gguf, settings, repack=repack)

                def theirs():
                    print(f"runner: {gguf.name} (round {round_no})", file=sys.stderr)
                    return run_device_bench(ThisMachine(), remote, str(gguf.resolve()), settings, workdir=work,
                                            threads=threads, repack=repack)
                try:
                    if round_no % 2:
                        (eq, c_eq), (rn, c_rn) = timed_with_contention(ours), timed_with_contention(theirs)
                    else:
                        (rn, c_rn), (eq, c_eq) = timed_with_contention(theirs), timed_with_contention(ours)
                except (BenchError, EdgequantError) as exc:
                    console.print(f"[red]{gguf}: {exc}[/red]")
                    continue
                for test, a, b, n in (("pp", eq.pp, rn.pp, settings.n_prompt), ("tg", eq.tg, rn.tg, settings.n_gen)):
                    ratio = b.mean / a.mean
                    ratios.setdefault((gguf.name, test), []).append(ratio)
                    table.add_row(gguf.name, f"{test}{n}", str(round_no), f"{a.mean:.2f} ± {a.stddev:.2f}",
                                  f"{b.mean:.2f} ± {b.stddev:.2f}", f"{ratio:.3f}", f"{_pct(c_eq)}/{_pct(c_rn)}",
                                  "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL")
                mib = 2 ** 20
                info.add_row(gguf.name, str(round_no), f"{eq.load_s:.3f}/{rn.load_s:.3f}",
                             f"{eq.peak_rss_bytes / mib:.0f}/{rn.peak_rss_bytes / mib:.0f}",
                             f"{eq.peak_rss_anon_bytes / mib:.0f}/{rn.peak_rss_anon_bytes / mib:.0f}",
                             f"{eq.peak_rss_file_bytes / mib:.0f}/{rn.peak_rss_file_bytes / mib:.0f}")
    if ratios:
        console.print(table)
        console.print(info)
        for (name, test), values in ratios.items():
            med = statistics.median(values)
            console.print(f"{name} {test}: median ratio {med:.3f} over {len(values)} round(s), "
                          f"target ±{TOLERANCE:.0%}: {'PASS' if abs(med - 1) <= TOLERANCE else 'FAIL'}")
        console.print(f"runner: {runner.path} (llama.cpp {runner.manifest.get('revision') if runner.manifest else '?'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
