#!/usr/bin/env python
"""edgequant's token-level statistics next to `llama-perplexity --kl-divergence` (run by hand; not a test).

On the same two GGUF files and the same text, edgequant's figures (the eval worker's full-vocabulary
code, summarized by ``bench.quality_stats.kld_statistics``) are printed beside llama-perplexity's
(built from the llama.cpp source vendored in the installed llama-cpp-python) for every statistic
llama-perplexity names: Mean, Median, 90/95/99/99.9 % and Maximum KLD, RMS Δp and Same top p.
Target: mean KLD, 99 % KLD and Same top p within 10 % (relative).

edgequant scores here the way llama-perplexity does (same chunks, same scored positions: the text
tokenized with BOS, cut into --ctx-token chunks whose first token is BOS, the positions from ctx/2 to
ctx-2 of each chunk, each predicting the next token of the text), so the two see the same positions.

Texts: the built-in suite's prompts and few-shot blocks (clinical English), and English prose that is
not the suite's: the docstrings of a fixed list of Python standard-library modules, gathered by this
script (so nothing is downloaded and the text is the same on every machine with the same Python).

By default the reference and the quantized files are the embedded default model's BF16, Q8_0, Q4_K_M
and Q2_K rungs, built (or found) in the shared cache; --ref/--test take other files.

Usage:
    .venv/bin/python benchmarks/kld_statistics.py                       # default model, both texts
    .venv/bin/python benchmarks/kld_statistics.py --types Q8_0 --texts prose
    .venv/bin/python benchmarks/kld_statistics.py --ref BF16.gguf --test Q4_K_M.gguf [--text FILE]

Timings are not reported: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_targets import _has_repack, default_text  # noqa: E402

from edgequant.bench.quality_stats import LLAMA_PERPLEXITY_NAMES, kld_statistics  # noqa: E402

TARGETS = ("mean_kld", "p99_kld", "same_top_p")     # within 10 % relative
TARGET = 0.10
PROSE_MODULES = ("argparse", "logging", "subprocess", "threading", "unittest", "decimal", "difflib", "heapq",
                 "textwrap", "statistics", "fractions", "bisect", "shlex", "tarfile", "zipfile", "email.message",
                 "http.client", "sqlite3", "calendar", "string", "functools", "itertools", "contextlib")


def prose_text(min_chars: int = 16_000) -> str:
    """English prose that is not the suite's: standard-library docstrings (module, then its public classes
    and functions), code lines and doctest lines dropped, in a fixed order."""
    parts: list[str] = []
    for name in PROSE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            lines = [ln for ln in doc.splitlines()
                     if ln.strip() and not ln.lstrip().startswith((">>>", "...", "$", "#")) and len(ln.split()) >= 4
                     and not re.search(r"[=(){}\[\]]{2,}", ln)]
            if lines:
                parts.append(" ".join(" ".join(lines).split()))
        if sum(len(p) for p in parts) >= min_chars:
            break
    return "\n\n".join(parts)


def edgequant_stats(ref: Path, test: Path, text: str, n_ctx: int, threads: int) -> tuple[dict[str, float], int]:
    """Our statistics, llama-perplexity's chunking (see the module docstring)."""
    import llama_cpp as L

    from edgequant.bench.eval_worker import RefRows, Session
    from edgequant.bench.host_worker import WorkerLog

    log = WorkerLog(L, False)
    sessions = [Session(L, {"path": str(p), "threads": threads, "repack": False, "mmap": True}, log)
                for p in (ref, test)]
    try:
        tokens = sessions[0].tokenize(text, add_special=True)
        first = n_ctx // 2
        klds: list[float] = []
        same: list[bool] = []
        dps: list[float] = []
        for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
            chunk = list(tokens[start:start + n_ctx])
            chunk[0] = L.llama_vocab_bos(sessions[0].vocab)
            rows = []
            for sess in sessions:
                sess.ensure_context(n_ctx)
                L.llama_memory_clear(sess.mem, False)
                sess.decode(chunk, logits_all=True)
                rows.append(np.stack([sess.logits(i) for i in range(first, n_ctx - 1)]))
            d, t, p = RefRows(rows[0]).compare(rows[1], chunk[first + 1:n_ctx])
            klds += d.tolist()
            same += t.tolist()
            dps += p.tolist()
    finally:
        for sess in sessions:
            sess.close()
    return kld_statistics(klds, dps, same), len(klds)


_NUMBER = r"([-+0-9.eE]+|nan|inf)"


def perplexity_stats(ref: Path, test: Path, text_file: Path, n_ctx: int, threads: int) -> dict[str, float]:
    from edgequant.bench.llamacpp_tools import build_llama_tool

    exe = build_llama_tool("llama-perplexity", on_progress=lambda m: print(f"  {m}", file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.kld"
        common = ["-f", str(text_file), "-c", str(n_ctx), "-t", str(threads)]
        if _has_repack(exe):       # repacking off, as edgequant's default on AMX hosts (where it crashes)
            common.append("--no-repack")
        res = subprocess.run([str(exe), "-m", str(ref), "--kl-divergence-base", str(base), *common],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit("llama-perplexity failed on the reference:\n" + res.stderr[-2000:])
        res = subprocess.run([str(exe), "-m", str(test), "--kl-divergence-base", str(base), "--kl-divergence",
                              *common], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"llama-perplexity failed on {test}:\n" + res.stderr[-2000:])
    log = res.stdout + res.stderr
    out: dict[str, float] = {}
    for key, label in LLAMA_PERPLEXITY_NAMES.items():
        m = re.search(re.escape(label).replace(r"\ ", r"\s+") + r"\s*:\s*" + _NUMBER, log)
        if m:
            value = float(m.group(1))
            out[key] = value / 100.0 if key in ("rms_dp", "same_top_p") else value   # printed in %
    if "mean_kld" not in out:
        raise SystemExit("could not read llama-perplexity's KLD output:\n" + log[-2000:])
    return out


def default_files(types: list[str]) -> tuple[Path, list[Path]]:
    """The embedded default model's reference and ``types`` rungs, built (or found) in the shared cache."""
    from dataclasses import replace

    from edgequant.core.paths import cache_dir
    from edgequant.pipeline.prepare import build_ladder, resolve_model
    from edgequant.pipeline.scope import NullReporter
    from edgequant.profiles import load_profile

    cache = cache_dir()
    resolved = resolve_model(None, cache, NullReporter())
    profile = load_profile("default")
    profile = replace(profile, quant=replace(profile.quant, types=tuple(types)))
    arts = build_ladder(resolved, profile, cache, NullReporter())
    return arts[0].path, [a.path for a in arts[1:]]


def report(name: str, test: Path, ours: dict[str, float], n: int, theirs: dict[str, float]) -> bool:
    print(f"  {test.name} on {name}: {n} positions")
    ok = True
    for key, label in LLAMA_PERPLEXITY_NAMES.items():
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None:
            print(f"    {label:12s} edgequant {a!s:>10}  llama-perplexity {b!s:>10}")
            continue
        ratio = a / b if b else float("inf")
        scale = 100.0 if key in ("rms_dp", "same_top_p") else 1.0
        unit = " %" if scale == 100.0 else ""
        line = (f"    {label:12s} edgequant {a * scale:10.5f}{unit}  llama-perplexity {b * scale:10.5f}{unit}  "
                f"ratio {ratio:6.3f}")
        if key in TARGETS:
            good = abs(ratio - 1.0) <= TARGET
            ok &= good
            line += f"  target ±{TARGET:.0%}: {'PASS' if good else 'FAIL'}"
        print(line)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, help="reference GGUF (default: the default model's BF16 rung)")
    ap.add_argument("--test", type=Path, action="append", default=[], help="quantized GGUF (repeatable)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K", help="the default model's rungs to compare")
    ap.add_argument("--texts", default="suite,prose", help="which built-in texts: suite, prose")
    ap.add_argument("--text", type=Path, help="score this text file instead of the built-in texts")
    ap.add_argument("--max-chars", type=int, default=None,
                    help="cut each text to this many characters (a quicker run; keep >= 2 chunks of --ctx tokens)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if bool(args.ref) != bool(args.test):
        ap.error("give --ref and --test together, or neither (the default model's rungs)")
    ref, tests = (args.ref, args.test) if args.ref else default_files([t.strip() for t in args.types.split(",")])
    texts = ({"file " + args.text.name: args.text.read_text()} if args.text else
             {k: v for k, v in (("suite", default_text()), ("prose", prose_text()))
              if k in [t.strip() for t in args.texts.split(",")]})
    if args.max_chars:
        texts = {k: v[:args.max_chars] for k, v in texts.items()}
    print(f"token-level statistics, edgequant vs llama-perplexity --kl-divergence (c={args.ctx}, reference "
          f"{ref.name}); target: {', '.join(TARGETS)} within {TARGET:.0%}")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            path = Path(tmp) / f"{name.replace(' ', '_')}.txt"
            path.write_text(text)
            print(f"text {name}: {len(text):,} characters", flush=True)
            for test in tests:
                print(f"  scoring {test.name} with edgequant ...", file=sys.stderr, flush=True)
                ours, n = edgequant_stats(ref, test, text, args.ctx, args.threads)
                print(f"  scoring {test.name} with llama-perplexity ...", file=sys.stderr, flush=True)
                theirs = perplexity_stats(ref, test, path, args.ctx, args.threads)
                all_ok &= report(name, test, ours, n, theirs)
                sys.stdout.flush()
    print("all targets met" if all_ok else "some targets missed")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
