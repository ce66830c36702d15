"""Print the ONNX rungs' targets on the embedded Gemma 3 270M (run by hand, not by the tests).

1. Time to export the default model with optimum and make the int8 and int4 variants, from an empty
   artifacts folder (target: under 3 minutes on 2 cores), and the time of a second build, which must
   reuse every artifact (target: a few seconds, nothing rebuilt).
2. Faithfulness of the fp32 export before any quantization, on the built-in triage suite: the share of
   cases whose greedy output is byte-identical to the bf16 checkpoint's own, decoded by transformers in
   float32 with the same prompts, token ids and stop rules (target >= 95 %), and top-1 agreement of the
   teacher-forced distributions with the bf16 GGUF reference's (target >= 0.99).  For scale, it also
   prints how many cases the bf16 GGUF reference itself (llama.cpp) decodes like the checkpoint.

    python benchmarks/onnx_targets.py [--cache-dir DIR] [--threads N] [--suite NAME|PATH] [--skip-quality]

The bf16 reference GGUF and its suite outputs come from (and stay in) the normal edgequant cache; the
ONNX artifacts of step 1 are built in a temporary folder so the timing starts from nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help="edgequant cache (default: the normal one)")
    ap.add_argument("--threads", type=int, default=0, help="0 = one per physical core")
    ap.add_argument("--suite", default="triage")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()

    from edgequant.core.paths import cache_dir
    from edgequant.pipeline.prepare import build_ladder, resolve_model
    from edgequant.pipeline.scope import NullReporter
    from edgequant.profiles import BenchSettings, _Checker, load_profile, parse_onnx
    from edgequant.quantize.onnx_export import OnnxLadder
    from edgequant.quantize.onnx_exporter import install_exporter

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir()
    reporter = NullReporter()
    resolved = resolve_model(None, cache, reporter)
    spec = parse_onnx(_Checker(Path("onnx_targets")), {"variants": ["fp32", "int8", "int4"]})
    install_exporter()   # once per environment (`edgequant setup-onnx`); not timed

    work = Path(tempfile.mkdtemp(prefix="eq-onnx-targets-"))
    try:
        ladder = OnnxLadder(resolved.checkpoint, resolved.model_hash, spec, work)
        t0 = time.perf_counter()
        arts = ladder.build()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = OnnxLadder(resolved.checkpoint, resolved.model_hash, spec, work).build()
        second = time.perf_counter() - t0
        print(f"model {resolved.checkpoint.model_id} ({resolved.checkpoint.n_params_estimate / 1e6:.0f} M params)")
        for a in arts:
            print(f"  {a.quant:<10} {a.size_bytes / 2**20:8.1f} MiB  {a.bits_per_weight:6.2f} bits/w  "
                  f"made in {a.seconds:6.1f} s")
        verdict = "PASS" if first < 180 else "FAIL"
        print(f"export + int8 + int4 from nothing: {first:.1f} s (target < 180 s) {verdict}")
        reused = all(a.reused for a in again)
        print(f"second build: {second:.1f} s, every artifact reused: {reused} {'PASS' if reused else 'FAIL'}")
        if args.skip_quality:
            return 0

        from edgequant.bench.onnx_eval import checkpoint_outputs, evaluate_onnx_rung
        from edgequant.bench.quality import reference_outputs
        from edgequant.profiles.suites import load_suite

        profile = load_profile("default")
        from dataclasses import replace

        profile = replace(profile, quant=replace(profile.quant, types=()))
        gguf = build_ladder(resolved, profile, cache, reporter)
        ref_art = gguf[0]
        settings = BenchSettings(threads=args.threads)
        threads = settings.resolved_threads()
        suite = load_suite(args.suite)
        t0 = time.perf_counter()
        ref = reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, cache, threads,
                                profile.bench.resolved_repack(), "auto", 7200, lambda p: None)
        print(f"reference outputs ({ref_art.quant} GGUF, {len(suite.cases)} cases): {time.perf_counter() - t0:.0f} s")
        fp32 = next(a for a in arts if a.variant == "fp32")
        t0 = time.perf_counter()
        q = evaluate_onnx_rung(fp32.path, fp32.quant, suite, ref, threads, 7200,
                               lambda p: print(f"\r  {p}   ", end="", file=sys.stderr))
        print(file=sys.stderr)
        print(f"ONNX-FP32 eval: {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        ckpt = checkpoint_outputs(resolved.checkpoint.path, suite, ref, threads, 7200,
                                  lambda p: print(f"\r  checkpoint {p}   ", end="", file=sys.stderr))
        print(file=sys.stderr)
        print(f"checkpoint (transformers, float32) eval: {time.perf_counter() - t0:.0f} s")
        want = {c.case.id: c.output for c in ckpt.cases}
        n = len(q.cases)
        same = sum(c.output == want[c.case.id] for c in q.cases)
        share = same / n
        gguf_same = sum(ref.cases[cid].output == out for cid, out in want.items())
        onnx_gguf = sum(c.output == ref.cases[c.case.id].output for c in q.cases)
        m = {x.metric: x.value for x in q.metrics}
        print(f"fp32 ONNX greedy outputs identical to the bf16 checkpoint's: {same}/{n} = {share:.1%} "
              f"(target >= 95 %) {'PASS' if share >= 0.95 else 'FAIL'}")
        print(f"  for scale: bf16 GGUF (llama.cpp) identical to the checkpoint's {gguf_same}/{n} = {gguf_same / n:.1%}; "
              f"fp32 ONNX identical to the bf16 GGUF's {onnx_gguf}/{n} = {onnx_gguf / n:.1%}")
        print(f"top-1 agreement: {m['top1_agreement']:.4f} (target >= 0.99) "
              f"{'PASS' if m['top1_agreement'] >= 0.99 else 'FAIL'}; mean KLD {m['mean_kld']:.5f} nats")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
