#!/usr/bin/env python
"""Push throughput of edgequant's device transports against AOSP `adb push` (run by hand; prints figures).

A 64 MiB file of random bytes goes to the ADB test peer (tests/adbpeer, running
in its own process so it does not share this process's GIL) with:

1. direct: edgequant's adb-shell transport (no adb server),
2. server: edgequant's adbutils transport through the AOSP adb server,
3. adb push: the AOSP client from adbutils' wheel through the same server.

The three alternate for --rounds rounds (the order rotates every round) and
the medians are compared.  Target: each transport >= 0.8x adb push.  The
process CPU seconds of (1) and (2) are printed too.  Usage:

    .venv/bin/python benchmarks/push_throughput.py [--mib 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
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
peer = AdbPeer(Path(sys.argv[2]), authorized_keys=[sys.argv[3]], use_qemu=False).start()
print(peer.port, flush=True)
sys.stdin.read()
peer.close()
"""


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="file size in MiB (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three pushes (default 3)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="push-throughput-"))
    key = write_host_key(tmp / "home")
    sandbox = tmp / "device"
    sandbox.mkdir()
    peer = subprocess.Popen([sys.executable, "-c", PEER_MAIN, str(REPO / "tests"), str(sandbox), key.public_line],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(peer.stdout.readline())
    serial = f"127.0.0.1:{port}"
    adb = AdbCli.create(key.home, tmp / "adb-server.log")
    os.environ.update(adb.env)   # our transports find the same key and the same private server
    try:
        from edgequant.devices.direct import DirectTransport
        from edgequant.devices.server import ServerTransport, connect

        data = tmp / "payload.bin"
        with open(data, "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        size = data.stat().st_size
        adb.run("start-server")
        connect(serial)
        adb.wait_for_state(serial)
        direct = DirectTransport(serial)
        server = ServerTransport(serial)
        direct.shell("true", timeout=10)    # connect and authenticate outside the timing

        def run_direct(remote):
            direct.push(data, remote)

        def run_server(remote):
            server.push(data, remote)

        def run_adb(remote):
            res = adb.run("push", str(data), remote, serial=serial, timeout=600)
            if res.returncode != 0:
                raise SystemExit(f"adb push failed: {res.stderr.strip()}")

        ways = {"direct": run_direct, "server": run_server, "adb push": run_adb}
        rates: dict[str, list[float]] = {w: [] for w in ways}
        cpu: dict[str, list[float]] = {w: [] for w in ways}
        order = list(ways)
        for r in range(args.rounds):
            for name in order[r % 3:] + order[:r % 3]:
                remote = str(sandbox / f"pushed-{name.replace(' ', '-')}.bin")
                c0, t0 = cpu_seconds(), time.perf_counter()
                ways[name](remote)
                dt = time.perf_counter() - t0
                cpu[name].append(cpu_seconds() - c0)
                if os.path.getsize(remote) != size:
                    raise SystemExit(f"{name}: the pushed file has the wrong size")
                os.unlink(remote)
                rates[name].append(size / 1e6 / dt)
        direct.close()
        base = statistics.median(rates["adb push"])
        print(f"{args.mib} MiB to the ADB test peer over loopback, {args.rounds} rounds, median MB/s "
              f"(MB = 10^6 bytes); target >= {TARGET:.1f}x adb push")
        print(f"{'way':<10} {'MB/s':>8} {'min':>8} {'max':>8} {'ratio':>7} {'CPU s':>7}  verdict")
        for name in ways:
            med = statistics.median(rates[name])
            ratio = med / base
            verdict = "" if name == "adb push" else ("ok" if ratio >= TARGET else "BELOW TARGET")
            cpu_text = f"{statistics.median(cpu[name]):7.2f}" if name != "adb push" else "      -"
            print(f"{name:<10} {med:8.1f} {min(rates[name]):8.1f} {max(rates[name]):8.1f} {ratio:7.2f} "
                  f"{cpu_text}  {verdict}")
    finally:
        adb.kill_server()
        peer.stdin.close()
        peer.wait(timeout=30)
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
