#!/usr/bin/env python
"""The farm scheduler's overhead (run by hand; prints figures).

N simulated phones: ADB device peers (tests/adbpeer), each in its own process so they do
not share this process's GIL.  Every phone runs the same R rungs through
``edgequant.farm.run_farm`` with a cheap stand-in for llama-bench: per rung, a fresh
file of M MiB is pushed (edgequant's sha-checked push), the phone runs ``sleep S_i``
(phone i is slower: S_i = S * (1 + 0.25 i)), and one row goes to a real SQLite store
through the farm's LockedStore.  The lease is renewed before every rung, as in a real
run.  Opening the phones (lease, facts, runner install) is done before the timing.

Measured: each phone's own work (that phone alone through run_farm: its wall time),
then all N phones together through run_farm.  Target: together <= 1.1 x the slowest
phone's own work (and not the sum).  Usage:

    .venv/bin/python benchmarks/farm_overhead.py [--phones 4] [--rungs 5] [--sleep 1.0] [--mib 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from adbpeer import write_host_key  # noqa: E402

TARGET = 1.1

PEER_MAIN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from adbpeer import AdbPeer
peer = AdbPeer(Path(sys.argv[2]), authorized_keys=[sys.argv[3]], use_qemu=False).start()
print(peer.port, flush=True)
sys.stdin.read()
peer.close()
"""


@dataclass(frozen=True)
class StandIn:
    """What the farm and its summary need of an artifact."""

    quant: str
    path: Path
    sha256: str


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phones", type=int, default=4, help="simulated phones (default 4)")
    ap.add_argument("--rungs", type=int, default=5, help="rungs per phone (default 5)")
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds of device work per rung on phone 0 (1.0)")
    ap.add_argument("--mib", type=int, default=4, help="MiB pushed per rung (default 4)")
    args = ap.parse_args()

    from edgequant import farm
    from edgequant.bench.runner import cached_runners
    from edgequant.devices import select
    from edgequant.devices.push import file_sha256
    from edgequant.pipeline.host import BenchOutcome, RungOutcome
    from edgequant.pipeline.scope import NullReporter
    from edgequant.results.store import Measurement, RowKey, Store

    runners = [r for r in cached_runners() if r.runs_on("aarch64", "linux")]
    if not runners:
        raise SystemExit("no cached linux-arm64 runner: `edgequant runner build --target linux-arm64` first")
    runner = runners[0]

    tmp = Path(tempfile.mkdtemp(prefix="farm-overhead-"))
    key = write_host_key(tmp / "home")
    os.environ["ANDROID_USER_HOME"] = str(key.home / ".android")
    peers, targets, secs, workdirs = [], [], {}, {}
    try:
        for i in range(args.phones):
            sandbox = tmp / f"device-{i}"
            sandbox.mkdir()
            proc = subprocess.Popen([sys.executable, "-c", PEER_MAIN, str(REPO / "tests"), str(sandbox),
                                     key.public_line], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            peers.append(proc)
            serial = f"127.0.0.1:{int(proc.stdout.readline())}"
            targets.append(select.Target(serial, "direct"))
            secs[serial] = round(args.sleep * (1 + 0.25 * i), 3)
            workdirs[serial] = str(sandbox / "eq")

        store = Store(tmp / "results.db")
        run_id = store.start_run("benchmarks/farm_overhead.py", "farm-overhead", "none", "none")
        shared = farm.LockedStore(store)

        def make_rungs(tag: str) -> list[StandIn]:
            out = []
            for r in range(args.rungs):
                path = tmp / f"{tag}-R{r}.bin"
                path.write_bytes(os.urandom(args.mib << 20))     # new bytes: every push is a real one
                out.append(StandIn(f"R{r}", path, file_sha256(path)))
            return out

        def job(ctx, todo, reporter):
            outcome = BenchOutcome(run_id)
            for art in todo:
                reporter.rung_started(art.quant)
                ctx.pusher.push(art.path, art.sha256, name=f"{art.quant}.bin")
                res = ctx.transport.shell(f"sleep {secs[ctx.serial]}", 120)
                if not res.ok:
                    raise SystemExit(f"sleep failed on {ctx.serial}: {res.stdout}")
                key_ = RowKey(model_id="none", model_hash="none", quant=art.quant, artifact_sha256=art.sha256,
                              is_reference=False, device_id=ctx.device_id, device={}, runtime="stand-in",
                              runtime_version="0", params={"sleep": secs[ctx.serial]})
                shared.record_rung(run_id, key_, [Measurement("work", secs[ctx.serial], "s")])
                outcome.outcomes.append(RungOutcome(art, "ok"))
            return outcome

        def timed(chosen: list, tag: str) -> float:
            rungs = make_rungs(tag)
            phones = []
            for t in chosen:
                phones += farm.open_phones([t], workdirs[t.serial], str(runner.path), tmp / "cache", NullReporter(),
                                           lease_wait=0)
            try:
                start = time.perf_counter()
                result = farm.run_farm(phones, {p.serial: rungs for p in phones}, job, runner_dir=str(runner.path),
                                       cache_root=tmp / "cache")
                wall = time.perf_counter() - start
            finally:
                farm.close_phones(phones)
            bad = [p.serial for p in result.phones if p.failure or len(p.outcomes) != args.rungs]
            if bad:
                raise SystemExit(f"phones did not finish every rung: {', '.join(bad)}")
            return wall

        own = {}
        for i, t in enumerate(targets):
            own[t.serial] = timed([t], f"alone{i}")
        together = timed(targets, "farm")
        slowest = max(own.values())
        total = sum(own.values())
        ratio = together / slowest
        rows = len(store.rung_statuses(run_id))

        print(f"farm scheduler overhead: {args.phones} simulated phones (ADB device peers, one process each), "
              f"{args.rungs} rungs each;")
        print(f"per rung: push {args.mib} MiB (sha-checked), `sleep S` on the phone, one row stored "
              f"(SQLite, LockedStore); lease renewed before each rung")
        print(f"{'phone':<18} {'S per rung':>10} {'own work s':>11}")
        for t in targets:
            print(f"{t.serial:<18} {secs[t.serial]:>10.2f} {own[t.serial]:>11.2f}")
        print(f"all {args.phones} together through run_farm: {together:.2f} s wall "
              f"(slowest phone alone {slowest:.2f} s, sum of all {total:.2f} s); {rows} rung rows stored")
        print(f"together / slowest = {ratio:.3f} (target <= {TARGET:.2f}): {'ok' if ratio <= TARGET else 'MISSED'}; "
              f"together / sum = {together / total:.3f}")
        return 0 if ratio <= TARGET else 1
    finally:
        for proc in peers:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - best effort while cleaning up
                proc.kill()
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main())
