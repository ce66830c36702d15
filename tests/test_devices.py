"""edgequant's device layer against the ADB test peer (tests/adbpeer), over both transports:

* direct: adb-shell (with edgequant's transport fixes) talking to the peer's adbd, no server;
* server: adbutils through the real AOSP adb server (private port) that `adb connect`ed the peer.

Facts, exit codes, safe pushes with faults (drop mid-push, full disk), refused
and stalled services, unauthorized keys, unknown serials, and the
`edgequant devices` commands through the real CLI.

Every test meets two daemons (the peer's personalities): a modern adbd (1 MiB
payloads, shell v2, delayed acks offered) and a legacy one (4 KiB payloads,
checksums, no shell v2, no exec:, every stream ended with CLSE(0, id)).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from adbpeer import Temperature
from conftest import assert_one_line_error, cli_env, run_cli
from edgequant.devices import push as P
from edgequant.devices import select
from edgequant.devices.adb_wire import byte_sum
from edgequant.devices.direct import DirectTransport
from edgequant.devices.facts import collect_facts, recommended_threads
from edgequant.devices.server import ServerTransport
from edgequant.devices.transport import DeviceError
from edgequant.core.errors import BadInput

TRANSPORTS = ("direct", "server")
PERSONALITIES = ("modern", "legacy")


@pytest.fixture(params=PERSONALITIES)
def adb_peer(request, adb_peer_factory):
    """conftest's peer, once as each daemon personality."""
    return adb_peer_factory(personality=request.param)


@pytest.fixture
def device_env(adb_cli, monkeypatch):
    """This process uses the test's adb key and the test's private adb server."""
    monkeypatch.setenv("ANDROID_USER_HOME", adb_cli.env["ANDROID_USER_HOME"])
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(adb_cli.server_port))
    for name in ("ADB_VENDOR_KEYS", "EDGEQUANT_DEVICES", "EDGEQUANT_DEVICE_DIR", "ANDROID_ADB_SERVER_HOST"):
        monkeypatch.delenv(name, raising=False)
    started = adb_cli.run("start-server")
    assert started.returncode == 0, started.stderr
    return adb_cli


def open_to(peer, kind: str):
    """A transport to the peer through our own device selection (server: `adb connect` first)."""
    target = select.Target(peer.serial, kind, connect=kind == "server")
    return select.open_transport(target)


@pytest.fixture(params=TRANSPORTS)
def transport(request, adb_peer, device_env):
    t = open_to(adb_peer, request.param)
    yield t
    t.close()


def sync_sends(peer) -> list[str]:
    return [d for d in peer.events_of("sync") if d.startswith("SEND")]


# ---------------------------------------------------------------------------
# facts and shell


def test_facts_in_one_round_trip(transport, adb_peer):
    adb_peer.set_prop("ro.product.model", "Pixel 8 Pro")
    adb_peer.set_prop("ro.soc.model", "Tensor G3")
    adb_peer.set_thermal(3, [Temperature("skin", 44.5, 3, 3), Temperature("cpu4-big-usr", 71.0)])
    adb_peer.set_battery(level=42, temperature_c=31.5, voltage_mv=3900)
    adb_peer.faults.disk_free = 5 * 2**30
    before = len(adb_peer.services)
    f = collect_facts(transport, str(adb_peer.sandbox / "eq"))
    shells = [s for s in adb_peer.services[before:] if s.startswith("shell")]
    assert len(shells) == 1, shells
    assert (f.serial, f.transport) == (adb_peer.serial, transport.kind)
    assert (f.model, f.soc, f.abi, f.android_release, f.sdk) == ("Pixel 8 Pro", "Google Tensor G3", "arm64-v8a",
                                                                 "14", 34)
    assert f.thermal_status == 3 and f.thermal_status_name == "severe"
    assert {t.name: t.celsius for t in f.temperatures} == {"skin": 44.5, "cpu4-big-usr": 71.0}
    assert (f.battery_level, f.battery_celsius, f.battery_mv) == (42, 31.5, 3900)
    assert f.workdir_free_kib == 5 * 2**20
    # the host's own /proc/meminfo stands in for the phone's
    with open("/proc/meminfo") as fh:
        total = int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1))
    assert f.ram_total_kib == total and 0 < f.ram_available_kib <= total
    assert f.cpu_count == os.cpu_count() and recommended_threads(f) >= 1


def test_shell_exit_codes_and_stderr(transport, adb_peer):
    ok = transport.shell("echo hello", timeout=20)
    assert (ok.exit_code, ok.stdout) == (0, "hello\n")
    three = transport.shell("echo before; exit 3", timeout=20)
    assert (three.exit_code, three.stdout) == (3, "before\n")
    err = transport.shell("echo out; echo problem >&2; exit 5", timeout=20)
    assert err.exit_code == 5
    if transport.kind == "server" and "shell_v2" in adb_peer.features:     # shell v2: stderr apart
        assert (err.stdout, err.stderr) == ("out\n", "problem\n")
    else:                                # adb-shell's v1 shell, and any daemon without v2, merge them
        assert (err.stdout, err.stderr) == ("out\nproblem\n", "")
    tricky = transport.shell("printf 'a b\\nno newline'; printf 'EQX0000000000000000:0\\n'; exit 7", timeout=20)
    assert tricky.exit_code == 7 and tricky.stdout.startswith("a b\nno newline")


def test_killed_command_reports_the_signal(transport, adb_peer):
    from adbpeer import LmkRule

    adb_peer.faults.lmk = [LmkRule(r"sleep 3[0-9]", delay=0.1)]
    res = transport.shell("sleep 31", timeout=30)
    assert res.exit_code == 137                                         # 128 + SIGKILL
    assert [cmd for _, cmd in adb_peer.lmk_kills] == ["sleep 31"]


def test_pull_round_trip(transport, adb_peer, tmp_path):
    payload = os.urandom(1_300_000)
    (adb_peer.sandbox / "result.json").write_bytes(payload)
    local = tmp_path / "out" / "result.json"
    transport.pull(str(adb_peer.sandbox / "result.json"), local)
    assert local.read_bytes() == payload
    assert [p.name for p in local.parent.iterdir()] == ["result.json"]     # no temporary left


@pytest.mark.parametrize("max_payload", [4096, 256 * 1024, 1024 * 1024])
def test_direct_push_fills_the_announced_payload(adb_peer_factory, device_env, tmp_path, max_payload):
    """Every WRTE of a push carries the maximum payload the daemon announced (the last one the rest)."""
    peer = adb_peer_factory(max_payload=max_payload)
    size = 1_500_000
    local = make_file(tmp_path / "m.gguf", size)
    t = DirectTransport(peer.serial, io_timeout=20)
    try:
        t.shell("true", timeout=20)
        before = dict(peer.host_writes)
        t.push(local, str(peer.sandbox / "m.gguf"))
    finally:
        t.close()
    assert (peer.sandbox / "m.gguf").read_bytes() == local.read_bytes()
    sizes = {n: c - before.get(n, 0) for n, c in peer.host_writes.items() if c > before.get(n, 0)}
    # the sync stream: SEND (8 + the path and mode), one DATA header (8) per 64 KiB of file, DONE (8)
    spec = len(f"{peer.sandbox / 'm.gguf'},{0o100644}")
    stream = 8 + spec + size + 8 * -(-size // 65536) + 8
    full, rest = divmod(stream, max_payload)
    assert sizes == ({max_payload: full, rest: 1} if rest else {max_payload: full})


@pytest.mark.parametrize("personality", ["legacy", "modern"])
def test_direct_push_sends_each_packet_in_one_write(adb_peer_factory, device_env, tmp_path, personality):
    """Header and payload leave in one write (adb-shell sends them in two); byte sums only where the
    daemon's protocol version needs them (we announce A_VERSION_SKIP_CHECKSUM, adb-shell 0x01000000)."""
    import struct

    from edgequant.devices.adb_wire import FixedTcpTransport

    writes: list[bytes] = []

    class Recording(FixedTcpTransport):
        def _send_all(self, data, transport_timeout_s):
            payload_sum = sum(bytes(data[24:])) & 0xFFFFFFFF
            writes.append(bytes(data[:24]) + len(data).to_bytes(8, "little") + payload_sum.to_bytes(4, "little"))
            return super()._send_all(data, transport_timeout_s)

    class RecordingDirect(DirectTransport):
        tcp_class = Recording

    peer = adb_peer_factory(personality=personality)
    local = make_file(tmp_path / "m.gguf", 200_000)
    t = RecordingDirect(peer.serial, io_timeout=20)
    try:
        t.shell("true", timeout=20)
        writes.clear()
        t.push(local, str(peer.sandbox / "m.gguf"))
    finally:
        t.close()
    assert (peer.sandbox / "m.gguf").read_bytes() == local.read_bytes()
    packets = [(rec[:4], struct.unpack("<I", rec[12:16])[0], int.from_bytes(rec[24:32], "little"))
               for rec in writes]
    wrtes = [rec for rec in writes if rec[:4] == b"WRTE"]
    assert len(wrtes) >= (200_000 // 4096 if personality == "legacy" else 1)
    assert all(written == 24 + length for _, length, written in packets), packets[:5]
    checks = {struct.unpack("<I", rec[16:20])[0] == int.from_bytes(rec[32:], "little") for rec in wrtes}
    zeros = {struct.unpack("<I", rec[16:20])[0] == 0 for rec in wrtes}
    if personality == "legacy":            # version 0x01000000: every payload summed (the peer checks it)
        assert checks == {True} and peer.events_of("cnxn")[0].startswith("version=0x01000001")
    else:                                  # version 0x01000001 on both sides: no sums
        assert zeros == {True}


def test_one_connection_runs_command_after_command_and_push_after_push(adb_peer, device_env, tmp_path):
    """The legacy daemon ends every stream with CLSE(0, id): that is an end, not a refusal."""
    local = make_file(tmp_path / "m.gguf", 300_000)
    t = DirectTransport(adb_peer.serial, io_timeout=20)
    try:
        for i in range(3):
            res = t.shell(f"echo run {i}; exit {i}", timeout=20)
            assert (res.exit_code, res.stdout) == (i, f"run {i}\n")
        for i in range(2):
            t.push(local, str(adb_peer.sandbox / f"copy{i}.gguf"))
            assert (adb_peer.sandbox / f"copy{i}.gguf").read_bytes() == local.read_bytes()
        t.pull(str(adb_peer.sandbox / "copy0.gguf"), tmp_path / "back.gguf")
        assert (tmp_path / "back.gguf").read_bytes() == local.read_bytes()
        assert t.shell("echo last", timeout=20).stdout == "last\n"
    finally:
        t.close()
    assert len(adb_peer.events_of("connect")) == 1            # never dropped and made again
    assert adb_peer.events_of("refused") == [] and adb_peer.events_of("protocol_error") == []
    assert not any(s.startswith(("exec:", "shell,")) for s in adb_peer.services)    # v1 shell and sync only


def test_delayed_acks_keep_the_push_window_full(adb_peer_factory, device_env, tmp_path):
    """A daemon offering delayed_ack gets more than one WRTE in flight; one without, exactly one;
    adb-shell's own streams (a shell printing more than the 32 MiB window) keep working under it."""
    local = make_file(tmp_path / "m.gguf", 6_000_000)
    in_flight = {}
    for personality in ("modern", "classic"):
        peer = adb_peer_factory(personality=personality)
        if personality == "modern":     # a slow device: only a host using the window has more than one WRTE out
            peer.read_delay = 0.05      # (the classic one's 4 KiB writes would take a minute at this pace)
        t = DirectTransport(peer.serial, io_timeout=20)
        try:
            t.push(local, str(peer.sandbox / "m.gguf"))
            if personality == "modern":
                res = t.shell("head -c 40000000 /dev/zero | tr '\\0' a", timeout=120)
                assert res.ok and res.stdout == "a" * 40_000_000
        finally:
            t.close()
        assert (peer.sandbox / "m.gguf").read_bytes() == local.read_bytes()
        in_flight[personality] = peer.max_unacked
        assert peer.events_of("refused") == []
    assert in_flight["modern"] > 1024 * 1024 >= in_flight["classic"]


def test_refused_sync_and_shell_are_one_line_naming_the_service(adb_peer, device_env, tmp_path):
    local = make_file(tmp_path / "m.gguf", 100_000)
    t = DirectTransport(adb_peer.serial, io_timeout=30)
    try:
        adb_peer.faults.refuse = {"sync:"}
        start = time.monotonic()
        with pytest.raises(DeviceError) as err:
            t.push(local, str(adb_peer.sandbox / "m.gguf"))
        assert err.value.kind == "refused" and "sync:" in str(err.value) and "m.gguf" in str(err.value)
        adb_peer.faults.refuse = {"shell"}
        with pytest.raises(DeviceError) as err:
            t.shell("echo one\necho two\x1b[2J\tthree", timeout=30)
        msg = str(err.value)
        assert err.value.kind == "refused" and "shell:" in msg and "echo one echo two?[2J three" in msg
        assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in msg), msg
        assert time.monotonic() - start < 10                   # at once, not after the 30 s I/O timeout
        adb_peer.faults.refuse = set()
        t.push(local, str(adb_peer.sandbox / "m.gguf"))         # and the next push goes through
        assert (adb_peer.sandbox / "m.gguf").read_bytes() == local.read_bytes()
    finally:
        t.close()


def test_bulk_write_sends_every_byte():
    """adb-shell's TcpTransport.bulk_write does one send() on a non-blocking socket and
    returns its count, which adb-shell ignores; ours loops until the whole packet is out."""
    import socket
    import threading

    from adb_shell.transport.tcp_transport import TcpTransport

    from edgequant.devices.adb_wire import FixedTcpTransport

    payload = os.urandom(4 << 20)

    def serve(listener, got):
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                got.extend(chunk)

    for cls in (TcpTransport, FixedTcpTransport):
        listener = socket.create_server(("127.0.0.1", 0))
        got = bytearray()
        thread = threading.Thread(target=serve, args=(listener, got), daemon=True)
        thread.start()
        transport = cls("127.0.0.1", listener.getsockname()[1])
        transport.connect(5)
        transport._connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = transport.bulk_write(payload, 5)
        transport.close()
        thread.join(10)
        listener.close()
        if cls is TcpTransport:
            assert sent < len(payload)          # the fault this test guards against is real
        else:
            assert sent == len(payload) and bytes(got) == payload


def test_server_falls_back_to_the_marker_without_shell_v2(adb_peer_factory, device_env):
    peer = adb_peer_factory(features=("fixed_push_mkdir",))
    t = open_to(peer, "server")
    res = t.shell("echo out; echo err >&2; exit 4", timeout=20)
    assert (res.exit_code, res.stdout, res.stderr) == (4, "out\nerr\n", "")
    assert not any(s.startswith("shell,v2") for s in peer.services)


def test_refused_and_stalled_services_are_one_line_errors(adb_peer, device_env):
    t = DirectTransport(adb_peer.serial, io_timeout=5)
    try:
        assert t.shell("true", timeout=10).ok
        adb_peer.faults.refuse = {"shell"}
        with pytest.raises(DeviceError) as err:
            t.shell("echo refused", timeout=60)
        assert err.value.kind == "refused" and "\n" not in str(err.value)
        assert len(adb_peer.events_of("refused")) == 1
        adb_peer.faults.refuse = set()
        adb_peer.faults.stall = {"shell": 3.0}
        with pytest.raises(DeviceError) as err:
            t.shell("echo late", timeout=1)
        assert err.value.kind == "timeout" and adb_peer.serial in str(err.value)
        adb_peer.faults.stall = {}
        assert t.shell("echo again", timeout=10).stdout == "again\n"     # reconnected after the error
    finally:
        t.close()


def test_unauthorized_key_is_one_line(adb_peer_factory, device_env):
    stranger = adb_peer_factory(authorized_keys=[])
    t = DirectTransport(stranger.serial, auth_timeout=1)
    with pytest.raises(DeviceError) as err:
        t.shell("true", timeout=10)
    msg = str(err.value)
    assert err.value.kind == "unauthorized" and "\n" not in msg
    assert stranger.serial in msg and "Allow USB debugging" in msg
    assert stranger.events_of("online") == []
    # through the adb server: `adb connect` fails to authenticate, and the server then lists the
    # device as unauthorized
    with pytest.raises(DeviceError) as err:
        open_to(stranger, "server")
    assert err.value.kind == "unauthorized" and "Allow USB debugging" in str(err.value)
    device_env.wait_for_state(stranger.serial, ("unauthorized",))
    for attempt in (lambda: ServerTransport(stranger.serial).shell("true", timeout=10),
                    lambda: select.open_transport(select.resolve([f"server:{stranger.serial}"])[0])):
        with pytest.raises(DeviceError) as err:
            attempt()
        assert err.value.kind == "unauthorized" and "\n" not in str(err.value)


def test_wrong_abi_and_unknown_serial(adb_peer, device_env):
    adb_peer.set_prop("ro.product.cpu.abi", "x86_64")
    adb_peer.set_prop("ro.product.cpu.abilist", "x86_64,x86")
    t = open_to(adb_peer, "direct")
    try:
        facts = collect_facts(t, str(adb_peer.sandbox / "eq"))
    finally:
        t.close()
    with pytest.raises(DeviceError) as err:
        select.require_arm64(facts)
    assert err.value.kind == "abi" and "x86_64" in str(err.value)
    with pytest.raises(BadInput) as err:
        select.resolve(["NOSUCHPHONE"])
    assert "NOSUCHPHONE" in str(err.value)


def test_several_devices_and_none_chosen(adb_peer_factory, device_env):
    a, b = adb_peer_factory(), adb_peer_factory()
    for p in (a, b):
        device_env.connect(p)
    with pytest.raises(BadInput) as err:
        select.resolve([])
    assert a.serial in str(err.value) and b.serial in str(err.value)
    assert select.resolve([a.serial]) == [select.Target(a.serial, "direct")]     # HOST:PORT: direct by default
    assert select.resolve([f"server:{a.serial}"]) == [select.Target(a.serial, "server", connect=True)]
    assert set(select.resolve(["all"])) == {select.Target(a.serial, "server"), select.Target(b.serial, "server")}


# ---------------------------------------------------------------------------
# pushes


def make_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def remote_files(peer, workdir: Path) -> list[str]:
    models = workdir / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def test_push_skips_same_sha(transport, adb_peer, tmp_path):
    local = make_file(tmp_path / "model-Q4_0.gguf", 3_000_000)
    workdir = adb_peer.sandbox / "eq"
    seen = []
    pusher = P.Pusher(transport, str(workdir), on_progress=seen.append)
    first = pusher.push(local)
    assert not first.skipped and first.transferred == 3_000_000
    final = Path(first.remote)
    assert final.read_bytes() == local.read_bytes()
    assert final.name == f"{P.file_sha256(local)[:16]}-model-Q4_0.gguf"
    assert remote_files(adb_peer, workdir) == [final.name]          # no partial left
    assert seen and seen[-1].done == seen[-1].total == 3_000_000 and seen[-1].mb_per_s > 0
    sends = len(sync_sends(adb_peer))
    assert sends == 1

    again = pusher.push(local)                                      # same run: remembered, no round trip
    assert again.skipped and again.transferred == 0
    fresh = P.Pusher(transport, str(workdir)).push(local)           # next run: asks the device, sends nothing
    assert fresh.skipped
    assert len(sync_sends(adb_peer)) == sends

    final.write_bytes(b"corrupted")                                 # a wrong file under the name is replaced
    repaired = P.Pusher(transport, str(workdir)).push(local)
    assert not repaired.skipped and final.read_bytes() == local.read_bytes()


def test_push_dropped_midway_leaves_nothing_complete(adb_peer, device_env, tmp_path):
    for kind in TRANSPORTS:
        local = make_file(tmp_path / f"{kind}.gguf", 2_000_000)
        workdir = adb_peer.sandbox / f"eq-{kind}"
        adb_peer.faults.drop_send_after = 700_000
        adb_peer.faults.drop_send_times = 1
        t = open_to(adb_peer, kind)
        with pytest.raises(DeviceError) as err:
            P.Pusher(t, str(workdir)).push(local)
        assert "\n" not in str(err.value)
        assert adb_peer.events_of("drop")
        assert not any(n.endswith(local.name) for n in remote_files(adb_peer, workdir)), \
            remote_files(adb_peer, workdir)
        t.close()
        # the next run reconnects and pushes again; no partial is left behind
        t = open_to(adb_peer, kind)
        result = P.Pusher(t, str(workdir)).push(local)
        t.close()
        assert not result.skipped and Path(result.remote).read_bytes() == local.read_bytes()
        assert remote_files(adb_peer, workdir) == [Path(result.remote).name]


def test_stale_partial_is_replaced(transport, adb_peer, tmp_path):
    local = make_file(tmp_path / "m.gguf", 100_000)
    workdir = adb_peer.sandbox / "eq"
    name = f"{P.file_sha256(local)[:16]}-m.gguf"
    (workdir / "models").mkdir(parents=True)
    (workdir / "models" / f".{name}.partial").write_bytes(b"half a file from a dead run")
    result = P.Pusher(transport, str(workdir)).push(local)
    assert not result.skipped and remote_files(adb_peer, workdir) == [name]


def test_out_of_space(transport, adb_peer, tmp_path):
    local = make_file(tmp_path / "big.gguf", 3 * 2**20)
    workdir = adb_peer.sandbox / "eq"
    adb_peer.faults.disk_free = 2**20
    with pytest.raises(DeviceError) as err:
        P.Pusher(transport, str(workdir)).push(local)
    msg = str(err.value)
    assert err.value.kind == "no_space" and "\n" not in msg
    assert "need 3 MiB, have 1 MiB" in msg
    assert sync_sends(adb_peer) == []                  # checked before sending a byte
    # df claims enough, the disk fills up during the write: the device's own error
    adb_peer.android.set_disk(10 * 2**30)
    with pytest.raises(DeviceError) as err:
        P.Pusher(transport, str(workdir)).push(local)
    assert err.value.kind == "no_space" and "No space left" in str(err.value)
    assert not any(n.endswith("big.gguf") and not n.startswith(".") for n in remote_files(adb_peer, workdir))


# ---------------------------------------------------------------------------
# the CLI


def cli_device_env(tmp_path, adb_cli, **extra):
    return cli_env(tmp_path, ANDROID_USER_HOME=adb_cli.env["ANDROID_USER_HOME"],
                   ANDROID_ADB_SERVER_PORT=str(adb_cli.server_port), HOME=adb_cli.env["HOME"], **extra)


def test_cli_devices_json_and_table(adb_peer_factory, device_env, tmp_path):
    via_server, via_direct = adb_peer_factory(), adb_peer_factory()
    via_server.set_prop("ro.product.model", "Galaxy S24")
    via_direct.set_battery(level=17)
    device_env.connect(via_server)
    env = cli_device_env(tmp_path, device_env, EDGEQUANT_DEVICES=via_direct.serial,
                         EDGEQUANT_DEVICE_DIR=str(via_server.sandbox / "eq"))
    res = run_cli("devices", "--json", env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r["serial"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {via_server.serial, via_direct.serial}
    assert rows[via_server.serial]["transport"] == "server" and rows[via_server.serial]["model"] == "Galaxy S24"
    assert rows[via_direct.serial]["transport"] == "direct" and rows[via_direct.serial]["battery_level"] == 17
    for r in rows.values():
        assert r["abi"] == "arm64-v8a" and r["recommended_threads"] >= 1 and r["ram_total_kib"] > 0
        assert r["workdir"] == str(via_server.sandbox / "eq")
    table = run_cli("devices", "--device", via_direct.serial, env=env, timeout=120)
    assert table.returncode == 0, table.stderr
    assert via_direct.serial in table.stdout and "Pixel 6" in table.stdout and "17%" in table.stdout
    assert via_server.serial not in table.stdout


def test_cli_devices_marks_the_devices_edgequant_cannot_use(adb_peer_factory, device_env, tmp_path):
    good = adb_peer_factory(personality="legacy")
    x86 = adb_peer_factory(props={"ro.product.cpu.abi": "x86_64", "ro.product.cpu.abilist": "x86_64,x86"})
    blocked = adb_peer_factory()
    stranger = adb_peer_factory(authorized_keys=[])
    workdir = tmp_path / "phone-dir" / "eq"         # the peers share this host's file system
    (blocked.sandbox / "eq").write_text("a file where the work directory would go")
    device_env.run("connect", stranger.serial)
    device_env.wait_for_state(stranger.serial, ("unauthorized",))
    env = cli_device_env(tmp_path, device_env, EDGEQUANT_DEVICES=f"{good.serial},{x86.serial}",
                         EDGEQUANT_DEVICE_DIR=str(workdir))
    res = run_cli("devices", "--json", env=env, timeout=120)
    assert res.returncode == 1                              # the unauthorized phone could not be read
    rows = {r["serial"]: r for r in json.loads(res.stdout)}
    assert rows[good.serial]["usable"] is True and rows[good.serial]["unusable_reason"] is None
    assert rows[good.serial]["workdir_writable"] is True and not workdir.exists()     # listing creates nothing
    assert rows[x86.serial]["usable"] is False and "ABI x86_64" in rows[x86.serial]["unusable_reason"]
    assert rows[stranger.serial]["usable"] is False
    assert "Allow USB debugging" in rows[stranger.serial]["unusable_reason"]
    res = run_cli("devices", "--json", "--device", blocked.serial, "--device-dir", str(blocked.sandbox / "eq" / "w"),
                  env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["usable"] is False and row["workdir_writable"] is False
    assert "cannot be created or written" in row["unusable_reason"]
    # the table says the same, one row per device
    table = run_cli("devices", env=env, timeout=120)
    assert table.returncode == 1
    lines = {p.serial: [ln for ln in table.stdout.splitlines() if p.serial in ln][0] for p in (good, x86, stranger)}
    assert "│ yes" in lines[good.serial]
    assert "no: ABI x86_64" in lines[x86.serial]
    assert "no: unauthorized" in lines[stranger.serial]
    assert_one_line_error(table.stderr, stranger.serial)


def test_cli_device_errors_are_one_line(adb_peer_factory, device_env, tmp_path):
    env = cli_device_env(tmp_path, device_env)
    res = run_cli("devices", env=env, timeout=60)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "no device found")
    peer = adb_peer_factory()
    device_env.connect(peer)
    res = run_cli("devices", "--device", "NOSUCHPHONE", env=env, timeout=60)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "unknown device serial 'NOSUCHPHONE'", peer.serial)
    stranger = adb_peer_factory(authorized_keys=[])
    device_env.run("connect", stranger.serial)
    device_env.wait_for_state(stranger.serial, ("unauthorized",))
    res = run_cli("devices", "--json", env=env, timeout=60)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, stranger.serial, "Allow USB debugging")
    rows = {r["serial"]: r for r in json.loads(res.stdout)}
    assert rows[stranger.serial]["error"] == "unauthorized" and rows[peer.serial]["model"] == "Pixel 6"


def test_cli_refused_shell_is_one_clean_line(adb_peer_factory, device_env, tmp_path):
    """The facts script is many lines: the error quotes a flattened, shortened excerpt of it."""
    peer = adb_peer_factory(personality="legacy")
    peer.faults.refuse = {"shell"}
    env = cli_device_env(tmp_path, device_env)
    res = run_cli("devices", "--device", peer.serial, env=env, timeout=60)
    assert res.returncode == 1
    line = assert_one_line_error(res.stderr, peer.serial, "refused the shell: service", "echo @@eqfacts-")
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [line]
    assert not any(ord(ch) < 32 for ch in line) and "…" in line


def test_one_line_flattens_and_shortens_quoted_text():
    from edgequant.core.errors import one_line

    assert one_line("a\nb\r\n\tc") == "a b c"
    assert one_line("bell\x07 esc\x1b[31m del\x7f zw\u200b ls\u2028") == "bell? esc?[31m del? zw? ls"
    assert one_line("x" * 50, 10) == "x" * 9 + "…" and one_line("short", 10) == "short"
    assert one_line(b"bytes") == "b'bytes'" and one_line("") == ""


def test_cli_devices_clean(adb_peer, device_env, tmp_path):
    workdir = adb_peer.sandbox / "eq"
    t = open_to(adb_peer, "direct")
    P.Pusher(t, str(workdir)).push(make_file(tmp_path / "m.gguf", 1_500_000))
    t.close()
    (adb_peer.sandbox / "keep.txt").write_text("not ours")
    env = cli_device_env(tmp_path, device_env)
    refused = run_cli("devices", "clean", adb_peer.serial, "--device-dir", "/data", env=env, timeout=60)
    assert refused.returncode == 2
    assert_one_line_error(refused.stderr, "refusing device work directory /data")
    res = run_cli("devices", "clean", adb_peer.serial, "--device-dir", str(workdir), env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and adb_peer.serial in res.stdout
    assert not workdir.exists()
    assert (adb_peer.sandbox / "keep.txt").read_text() == "not ours"


def test_clean_leaves_a_folder_without_our_marker(adb_peer, device_env):
    folder = adb_peer.sandbox / "users-own"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "precious.bin").write_text("data")
    t = open_to(adb_peer, "server")
    assert P.clean(t, str(folder)) == 0
    assert (folder / "models" / "precious.bin").read_text() == "data"


def test_fast_checksum_matches_adb_shell():
    from adb_shell.adb_message import checksum

    for data in (b"", b"\xff" * 70_000, os.urandom(1 << 20), bytearray(os.urandom(12345))):
        assert byte_sum(data) == checksum(data)


@pytest.mark.parametrize("size", [4096, 65536 + 8, 1 << 20])
def test_push_packets_cut_the_sync_stream_exactly(size):
    from edgequant.devices.direct import _packets

    pieces = [os.urandom(n) for n in (8, 3, 65536, 8, 65536, 8, 1000, 8, 0, 5, 300_000, 8)]
    packets = [(bytes(p), c) for p, c in _packets(iter(pieces), size, block=1 << 18)]
    assert b"".join(p for p, _ in packets) == b"".join(pieces)
    assert all(len(p) == size for p, _ in packets[:-1]) and 0 < len(packets[-1][0]) <= size
    assert all(c == sum(p) & 0xFFFFFFFF for p, c in packets)

