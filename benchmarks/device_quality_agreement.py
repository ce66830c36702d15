"""How often the on-device eval (``--quality-on-device``) writes what the host eval writes.

Run by hand; it prints figures and always exits 0 (it reports, it does not gate)::

    .venv/bin/python benchmarks/device_quality_agreement.py --runner-dir RUNNER \\
        --gguf BF16.gguf --gguf Q8_0.gguf --gguf Q4_0.gguf --cases 12 --max-tokens 24

For each GGUF, the first ``--cases`` cases of the suite (the built-in triage
suite by default, each format's ``max_tokens`` lowered to ``--max-tokens``) are
generated greedily twice: by the host eval (``edgequant.bench.eval_worker``,
batched, in-process llama.cpp on this x86 host) and by the device path of
``edgequant.pipeline.device_quality`` (the same prompts, the same shell script and
result reading) with the runner's ``llama-completion``.  A linux-arm64 runner
runs under ``qemu-aarch64-static -cpu cortex-a53`` through a transport that is
``/bin/sh`` on this machine (the folder plays the phone's work directory), so
ARM's NEON kernels (not x86's) compute the logits.  Printed per GGUF: cases
whose outputs are byte-identical, and for the others where they first differ.
The first GGUF is the reference the prompts are built from.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner_vs_bench import ThisMachine  # noqa: E402 - this folder's own helper

from edgequant.pipeline import device_quality as dq  # noqa: E402
from edgequant.bench.device_bench import RemoteRunner  # noqa: E402
from edgequant.bench.quality import base_request, call_worker  # noqa: E402
from edgequant.bench.runner import open_runner_dir  # noqa: E402
from edgequant.pipeline.scope import NullReporter  # noqa: E402
from edgequant.profiles.suites import load_suite  # noqa: E402


class LocalFolder(ThisMachine):
    """ThisMachine plus push and pull, which copy files here."""

    def push(self, local, remote, on_progress=None, timeout=None) -> None:
        shutil.copyfile(local, remote)

    def pull(self, remote, local, timeout=None) -> None:
        shutil.copyfile(remote, local)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner-dir", required=True, help="a linux-arm64 (qemu) or host runner folder")
    ap.add_argument("--gguf", action="append", required=True, help="GGUF files, the reference first")
    ap.add_argument("--suite", default="triage")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", default="cortex-a53", help="qemu -cpu for an aarch64 runner")
    args = ap.parse_args()

    suite = load_suite(args.suite)
    picked, seen = [], set()
    for case in suite.cases:                     # round-robin over the formats, so each is represented
        if len(picked) < args.cases and case.format not in seen:
            picked.append(case)
            seen.add(case.format)
            if len(seen) == len(suite.formats):
                seen = set()
    for case in suite.cases:
        if len(picked) < args.cases and case not in picked:
            picked.append(case)
    suite = replace(suite, cases=tuple(picked),
                    formats={k: replace(f, max_tokens=min(f.max_tokens, args.max_tokens))
                             for k, f in suite.formats.items()})

    runner = open_runner_dir(args.runner_dir)
    foreign = runner.machine == "aarch64" and os.uname().machine != "aarch64"
    launcher = ("qemu-aarch64-static", "-cpu", args.cpu) if foreign else ()
    work = Path(tempfile.mkdtemp(prefix="eq-devq-"))
    ctx = SimpleNamespace(transport=LocalFolder(), runner_path=runner.path, serial="this machine",
                          remote=RemoteRunner.for_runner(runner, str(runner.path), launcher=launcher))
    ggufs = [Path(g).resolve() for g in args.gguf]
    plan = dq._plan(suite, SimpleNamespace(path=ggufs[0]), ctx, args.threads, None, "auto", 1800, NullReporter())
    for name, data in (("prompts.bin", plan.prompts), ("quality.sh", plan.script.encode())):
        (work / name).write_bytes(data)
    print(f"{len(plan.order)} cases, {plan.prompting} prompting, max_tokens {args.max_tokens}, runner "
          f"{runner.path.name}{' under ' + ' '.join(launcher) if launcher else ''}; prompts whose whole-text "
          f"tokens differ from the host eval's: {len(plan.differ)}")
    try:
        for gguf in ggufs:
            req = base_request(gguf, suite, args.threads, None, "auto")
            host = {c["id"]: c for c in call_worker(req, 3600, lambda p: None)["cases"]}
            t0 = time.perf_counter()
            device, tokens, _secs = dq._run_rung(ctx, plan, str(work), str(gguf), gguf.stem, suite)
            wall = time.perf_counter() - t0
            same, notes = 0, []
            for cid, got in device.items():
                want = base64.b64decode(host[cid]["output_b64"])
                if got.output == want and got.stopped == host[cid]["stopped"]:
                    same += 1
                    continue
                at = next((i for i, (a, b) in enumerate(zip(got.output, want)) if a != b),
                          min(len(got.output), len(want)))
                notes.append(f"{cid}: differ from byte {at} ({got.stopped} vs {host[cid]['stopped']})")
            print(f"{gguf.name}: {same}/{len(device)} cases identical to the host eval "
                  f"({tokens} tokens generated on the device in {wall:.0f} s)")
            for n in notes:
                print(f"    {n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
