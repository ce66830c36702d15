#!/usr/bin/env python
"""Push throughput of edgequant's direct transport against AOSP `adb push`, per daemon (run by hand; prints figures).

A file of random bytes (50 MiB by default) goes to the ADB test peer
(tests/adbpeer, running in its own process so it does not share this
process's GIL) over loopback, once per daemon:

* a legacy daemon announcing 4 KiB payloads (the peer's "legacy" personality:
  CLSE(0, id) stream ends, checksums, no shell v2),
* a modern daemon announcing 1 MiB (the "modern" personality, which offers
  delayed acks; the AOSP client only takes them with ADB_BURST_MODE=1, which
  this script leaves unset, as users do),
* with ``--payloads 4096,262144,1048576``, also an Android 7/8-like daemon
  announcing 256 KiB without delayed acks ("classic"),

with two clients:

1. direct: edgequant's direct transport (adb-shell's connection, our sync push),
2. adb push: the AOSP client from adbutils' wheel, through its own adb server.

The two alternate for --rounds rounds (the order swaps every round) and the
medians are compared.  Target: direct >= 0.8x adb push for every daemon; the
exit status is 1 when a ratio is below it.  Usage:

    .venv/bin/python benchmarks/push_throughput.py [--mib 50] [--rounds 5] [--payloads 4096,1048576]

Timings on a busy machine mean little: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from adbpeer import write_host_key  # noqa: E402
from adbpeer.pytest_fixtures import AdbCli  # noqa: E402

TARGET = 0.8

PEER_MAIN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from adbpeer import AdbPeer
peer = AdbPeer(Path(sys.argv[2]), authorized_keys=[sys.argv[3]], personality=sys.argv[4],
               max_payload=int(sys.argv[5]), use_qemu=False).start()
print(peer.port, flush=True)
sys.stdin.read()
peer.close()
"""


def personality_for(payload: int) -> str:
    """4 KiB: an old or embedded adbd; below 1 MiB: Android 7 and 8 (256 KiB, no delayed acks); else modern."""
    return "legacy" if payload <= 4096 else "classic" if payload < 1024 * 1024 else "modern"


def measure(data: Path, adb: AdbCli, tmp: Path, key_line: str, payload: int, rounds: int) -> dict[str, list[float]]:
    """MB/s of each way, one entry per round, against one peer process announcing ``payload``."""
    from edgequant.devices.direct import DirectTransport
    from edgequant.devices.server import connect

    sandbox = tmp / f"device-{payload}"
    sandbox.mkdir()
    peer = subprocess.Popen([sys.executable, "-c", PEER_MAIN, str(REPO / "tests"), str(sandbox), key_line,
                             personality_for(payload), str(payload)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        serial = f"127.0.0.1:{int(peer.stdout.readline())}"
        connect(serial)
        adb.wait_for_state(serial)
        direct = DirectTransport(serial)
        direct.shell("true", timeout=10)    # connect and authenticate outside the timing
        announced = direct._tcp.device_max_payload
        if announced != payload:
            raise SystemExit(f"the peer announced {announced} bytes, not {payload}")
        size = data.stat().st_size

        def run_direct(remote):
            direct.push(data, remote)

        def run_adb(remote):
            res = adb.run("push", str(data), remote, serial=serial, timeout=900)
            if res.returncode != 0:
                raise SystemExit(f"adb push failed: {res.stderr.strip()}")

        ways = {"direct": run_direct, "adb push": run_adb}
        rates: dict[str, list[float]] = {w: [] for w in ways}
        order = list(ways)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                remote = str(sandbox / f"pushed-{name.replace(' ', '-')}.bin")
                t0 = time.perf_counter()
                ways[name](remote)
                dt = time.perf_counter() - t0
                if os.path.getsize(remote) != size:
                    raise SystemExit(f"{name}: the pushed file has the wrong size")
                os.unlink(remote)
                rates[name].append(size / 1e6 / dt)
        direct.close()
        return rates
    finally:
        peer.stdin.close()
        peer.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=50, help="file size in MiB (default 50)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the two pushes per daemon (default 5)")
    ap.add_argument("--payloads", default="4096,1048576",
                    help="max payloads the daemons announce, comma-separated (default 4096,1048576)")
    args = ap.parse_args()
    payloads = [int(p) for p in args.payloads.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="push-throughput-"))
    key = write_host_key(tmp / "home")
    adb = AdbCli.create(key.home, tmp / "adb-server.log")
    os.environ.update(adb.env)   # our transports find the same key and the same private server
    results = {}
    try:
        data = tmp / "payload.bin"
        with open(data, "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        adb.run("start-server")
        for payload in payloads:
            results[payload] = measure(data, adb, tmp, key.public_line, payload, args.rounds)
    finally:
        adb.kill_server()
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        tmp.rmdir()

    print(f"{args.mib} MiB to the ADB test peer over loopback, median of {args.rounds} rounds, MB/s "
          f"(MB = 10^6 bytes); target: direct >= {TARGET:.1f}x adb push")
    print(f"{'daemon':<24} {'direct':>8} {'adb push':>9} {'ratio':>6}  {'direct min-max':>15} "
          f"{'adb min-max':>15}  verdict")
    below = False
    for payload, rates in results.items():
        direct, aosp = statistics.median(rates["direct"]), statistics.median(rates["adb push"])
        ratio = direct / aosp
        below |= ratio < TARGET
        daemon = f"{personality_for(payload)}, {payload // 1024} KiB"
        print(f"{daemon:<24} {direct:8.1f} {aosp:9.1f} {ratio:6.2f}  "
              f"{min(rates['direct']):6.1f}-{max(rates['direct']):<8.1f} "
              f"{min(rates['adb push']):6.1f}-{max(rates['adb push']):<8.1f}  "
              f"{'ok' if ratio >= TARGET else 'BELOW TARGET'}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
