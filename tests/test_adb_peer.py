"""The ADB device peer (tests/adbpeer) against real ADB clients.

The AOSP ``adb`` client from adbutils' wheel and the adb-shell library talk to
the peer exactly as they talk to a phone; these tests check the peer gives the
answers a phone gives, and that each injectable fault does what it says.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from adb_shell.adb_device import AdbDeviceTcp
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from adb_shell.exceptions import AdbTimeoutError, PushFailedError, TcpTimeoutException

from adbpeer import AdbPeer, LmkRule, decode_android_pubkey, encode_android_pubkey
from adbpeer import keys as peer_keys

AARCH64_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
#if defined(__aarch64__)
    const char *arch = "aarch64";
#else
    const char *arch = "not-aarch64";
#endif
    int code = argc > 1 ? atoi(argv[1]) : 0;
    long mib = argc > 2 ? atol(argv[2]) : 0;
    if (mib > 0) {                      /* touch MIB mebibytes so they count in Max RSS */
        size_t n = (size_t)mib << 20;
        volatile char *p = malloc(n);
        for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    }
    if (argc > 3 && strcmp(argv[3], "dotprod") == 0)
        __asm__ volatile(".inst 0x4e829420" ::: "v0");   /* sdot v0.4s, v1.16b, v2.16b: ARMv8.2 */
    printf("hello from %s argv0=%s\n", arch, argv[0]);
    fprintf(stderr, "stderr line\n");
    return code;
}
"""


@pytest.fixture(scope="module")
def aarch64_hello(tmp_path_factory) -> Path:
    """A static aarch64 program: exit code argv[1], touches argv[2] MiB, argv[3]=dotprod runs an ARMv8.2 op."""
    folder = tmp_path_factory.mktemp("aarch64")
    source = folder / "hello.c"
    source.write_text(AARCH64_SOURCE)
    binary = folder / "hello"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O1", "-o", str(binary), str(source)], check=True,
                   capture_output=True, timeout=120)
    return binary


def adb_shell_device(peer: AdbPeer, host_key) -> AdbDeviceTcp:
    device = AdbDeviceTcp(peer.host, peer.port, default_transport_timeout_s=5)
    signer = PythonRSASigner(host_key.public_line, host_key.private_pem)
    assert device.connect(rsa_keys=[signer], auth_timeout_s=2)
    return device


# ---------------------------------------------------------------------------
# keys


def test_android_public_key_round_trip_and_token_signature(adb_host_key):
    """The adbkey.pub line decodes to the same key, and a host signature over a token verifies."""
    line = adb_host_key.public_path.read_text().strip()
    key = decode_android_pubkey(line)
    assert key.public_numbers() == adb_host_key.key.public_key().public_numbers()
    assert line.endswith(" edgequant-test@host")
    assert encode_android_pubkey(key, "edgequant-test@host") == line
    assert oct(adb_host_key.private_path.stat().st_mode & 0o777) == "0o600"

    token = os.urandom(20)
    signature = peer_keys.sign_token(adb_host_key.key, token)
    assert peer_keys.verify_token_signature(key, token, signature)
    assert not peer_keys.verify_token_signature(key, os.urandom(20), signature)
    # adb-shell's own signer (a different RSA implementation) produces a signature the peer accepts.
    adb_shell_signature = PythonRSASigner(adb_host_key.public_line, adb_host_key.private_pem).Sign(token)
    assert peer_keys.verify_token_signature(key, token, adb_shell_signature)
    with pytest.raises(peer_keys.KeyFormatError):
        decode_android_pubkey(line[:100] + " x@y")


# ---------------------------------------------------------------------------
# 1. the real AOSP client


def test_aosp_client_connect_push_shell_pull(adb_peer, adb_cli, tmp_path):
    connect = adb_cli.connect(adb_peer)
    assert f"connected to {adb_peer.serial}" in connect.stdout
    listing = adb_cli.run("devices", "-l").stdout
    assert re.search(rf"^{re.escape(adb_peer.serial)}\s+device .*model:Pixel_6 device:oriole", listing, re.M), listing
    serial = adb_peer.serial

    payload = os.urandom(300_000)
    local = tmp_path / "model.bin"
    local.write_bytes(payload)
    local.chmod(0o644)
    remote = adb_peer.sandbox / "data" / "local" / "tmp" / "model.bin"
    push = adb_cli.run("push", str(local), str(remote), serial=serial)
    assert push.returncode == 0, push.stderr
    assert remote.read_bytes() == payload
    assert local.stat().st_mode & 0o777 == 0o644
    assert remote.stat().st_mode & 0o777 == 0o666                  # adbd copies the user bits to group and other

    hi = adb_cli.run("shell", "echo hi", serial=serial)
    assert (hi.returncode, hi.stdout, hi.stderr) == (0, "hi\n", "")
    split = adb_cli.run("shell", "echo out; echo err >&2", serial=serial)
    assert (split.stdout, split.stderr) == ("out\n", "err\n")
    assert adb_cli.run("shell", "exit 3", serial=serial).returncode == 3
    cwd = adb_cli.run("shell", "pwd", serial=serial)
    assert cwd.stdout.strip() == os.path.realpath(adb_peer.sandbox)

    pulled = tmp_path / "pulled.bin"
    pull = adb_cli.run("pull", str(remote), str(pulled), serial=serial)
    assert pull.returncode == 0, pull.stderr
    assert pulled.read_bytes() == payload

    stdin = adb_cli.run("shell", "cat; echo done", serial=serial, input="line one\nline two")
    assert stdin.stdout == "line one\nline twodone\n"

    assert any(s.startswith("shell,v2,") for s in adb_peer.services), adb_peer.services
    assert "sync:" in adb_peer.services
    assert adb_peer.connection_count == 1          # the adb server multiplexes every command on one connection


def test_aosp_client_unauthorized_until_user_allows(adb_peer_factory, adb_cli, adb_host_key):
    peer = adb_peer_factory(authorized_keys=[])
    connect = adb_cli.run("connect", peer.serial)
    assert f"failed to authenticate to {peer.serial}" in connect.stdout
    assert adb_cli.wait_for_state(peer.serial, ("unauthorized",)) == "unauthorized"
    shell = adb_cli.run("shell", "echo hi", serial=peer.serial)
    assert shell.returncode != 0 and "unauthorized" in shell.stderr
    assert peer.events_of("auth")[-1].startswith("prompt pending")
    assert peer.authorized_keys == []

    assert peer.allow_pending() == 1               # the user taps "Allow"
    adb_cli.wait_for_state(peer.serial, ("device",))
    assert adb_cli.run("shell", "echo allowed", serial=peer.serial).stdout == "allowed\n"
    assert [decode_android_pubkey(k).public_numbers() for k in peer.authorized_keys] == \
        [adb_host_key.key.public_key().public_numbers()]


def test_aosp_client_auto_accept_and_auth_disabled(adb_peer_factory, adb_cli, adb_host_key):
    accepting = adb_peer_factory(authorized_keys=[], auto_accept=True)
    adb_cli.connect(accepting)
    assert [decode_android_pubkey(k).public_numbers() for k in accepting.authorized_keys] == \
        [adb_host_key.key.public_key().public_numbers()]
    open_peer = adb_peer_factory(authorized_keys=[], auth=False)
    adb_cli.connect(open_peer)
    assert adb_cli.run("shell", "echo open", serial=open_peer.serial).stdout == "open\n"
    assert open_peer.events_of("online") == ["auth disabled"]


def test_aosp_client_small_payload_and_concurrent_streams(adb_peer_factory, adb_cli, tmp_path):
    peer = adb_peer_factory(max_payload=4096, sndbuf=8192)
    adb_cli.connect(peer)
    assert "maxdata=1048576" in peer.events_of("cnxn")[0]       # the host offered 1 MiB, the device holds it to 4 KiB
    payload = os.urandom(700_000)
    (tmp_path / "f.bin").write_bytes(payload)
    remote = peer.sandbox / "f.bin"

    slow = adb_cli.popen("shell", "sleep 1; echo slow-done", serial=peer.serial)
    results = {}

    def run(name, *args):
        results[name] = adb_cli.run(*args, serial=peer.serial)

    threads = [threading.Thread(target=run, args=("push", "push", str(tmp_path / "f.bin"), str(remote))),
               threading.Thread(target=run, args=("big", "shell", "head -c 200000 /dev/zero | tr '\\0' x")),
               threading.Thread(target=run, args=("quick", "shell", "echo quick"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    out, _ = slow.communicate(timeout=30)
    assert out == "slow-done\n"
    assert results["push"].returncode == 0, results["push"].stderr
    assert remote.read_bytes() == payload
    assert results["big"].stdout == "x" * 200_000
    assert results["quick"].stdout == "quick\n"
    pulled = tmp_path / "back.bin"
    assert adb_cli.run("pull", str(remote), str(pulled), serial=peer.serial).returncode == 0
    assert pulled.read_bytes() == payload


# ---------------------------------------------------------------------------
# personalities: the daemons phones really run


def _raw_session(peer: AdbPeer, host_banner: bytes = b"host::\0"):
    """A bare socket through CNXN (the peer runs without auth): send(cmd, a0, a1, data), recv() -> Message."""
    import socket

    from adbpeer import wire

    sock = socket.create_connection((peer.host, peer.port), timeout=10)

    def send(command, arg0, arg1, data=b""):
        sock.sendall(wire.Message(command, arg0, arg1, data).pack(True))

    def recv():
        def exact(n):
            out = b""
            while len(out) < n:
                chunk = sock.recv(n - len(out))
                assert chunk, "the peer closed the connection"
                out += chunk
            return out
        command, arg0, arg1, length, _check, _magic = wire.HEADER.unpack(exact(wire.HEADER.size))
        return wire.Message(command, arg0, arg1, exact(length) if length else b"")

    send(wire.A_CNXN, wire.A_VERSION_MIN, wire.MAX_PAYLOAD, host_banner)
    reply = recv()
    assert reply.command == wire.A_CNXN
    return sock, send, recv, reply


@pytest.mark.parametrize("personality, close_arg0_is_zero", [("classic", False), ("legacy", True)])
def test_stream_close_on_the_wire(adb_peer_factory, personality, close_arg0_is_zero):
    """A modern adbd ends a stream with CLSE(its id, our id); a legacy one with CLSE(0, our id), the
    same packet that refuses an OPEN; both refuse an unknown service with CLSE(0, our id)."""
    from adbpeer import wire

    peer = adb_peer_factory(personality=personality, auth=False, use_qemu=False)
    sock, send, recv, cnxn = _raw_session(peer)
    with sock:
        assert cnxn.arg1 == (4096 if personality == "legacy" else 1024 * 1024)
        assert cnxn.arg0 == (0x01000000 if personality == "legacy" else 0x01000001)
        send(wire.A_OPEN, 7, 0, b"shell:echo hi\0")
        okay = recv()
        assert (okay.command, okay.arg1) == (wire.A_OKAY, 7) and okay.arg0 != 0
        out = b""
        while (m := recv()).command == wire.A_WRTE:
            out += m.data
            send(wire.A_OKAY, 7, okay.arg0)
        assert out.replace(b"\r\n", b"\n") == b"hi\n"
        assert (m.command, m.arg1) == (wire.A_CLSE, 7)
        assert m.arg0 == (0 if close_arg0_is_zero else okay.arg0)
        send(wire.A_OPEN, 8, 0, b"no-such-service:\0")
        refused = recv()
        assert (refused.command, refused.arg0, refused.arg1) == (wire.A_CLSE, 0, 8)


def test_legacy_daemon_checks_checksums_and_knows_only_shell_and_sync(adb_peer_factory):
    from adbpeer import wire

    peer = adb_peer_factory(personality="legacy", auth=False, use_qemu=False)
    sock, send, recv, _ = _raw_session(peer)
    with sock:
        for number, service in enumerate((b"shell,v2,raw:echo hi", b"exec:echo hi"), start=1):
            send(wire.A_OPEN, number, 0, service + b"\0")
            refused = recv()
            assert (refused.command, refused.arg0, refused.arg1) == (wire.A_CLSE, 0, number)
        bad = wire.Message(wire.A_OPEN, 9, 0, b"shell:true\0").pack(True)
        sock.sendall(bad[:16] + (1).to_bytes(4, "little") + bad[20:])   # a wrong checksum: adbd hangs up
        peer.wait_for(lambda: peer.connection_count == 0, what="the connection to drop")
    assert any("checksum" in e for e in peer.events_of("protocol_error"))


def test_aosp_client_against_the_legacy_daemon(adb_peer_factory, adb_cli, tmp_path):
    peer = adb_peer_factory(personality="legacy")
    adb_cli.connect(peer)
    payload = os.urandom(500_000)
    (tmp_path / "f.bin").write_bytes(payload)
    push = adb_cli.run("push", str(tmp_path / "f.bin"), str(peer.sandbox / "f.bin"), serial=peer.serial)
    assert push.returncode == 0, push.stderr
    assert (peer.sandbox / "f.bin").read_bytes() == payload
    assert max(peer.host_writes) == 4096                         # the client keeps to the announced payload
    res = adb_cli.run("shell", "echo out; echo err >&2; exit 3", serial=peer.serial)
    assert (res.returncode, res.stdout.replace("\r\n", "\n")) == (0, "out\nerr\n")   # no shell v2: no exit code
    assert adb_cli.run("exec-out", "echo hi", serial=peer.serial).returncode != 0
    assert "exec:echo hi" in peer.events_of("unknown_service")
    assert not any(s.startswith("shell,") for s in peer.services)


def test_aosp_client_with_delayed_acks(adb_peer_factory, adb_cli, tmp_path):
    """ADB_BURST_MODE=1 makes the AOSP client offer delayed_ack: with the modern personality the
    real client keeps several WRTEs in flight, and shell v2 still gives exit codes."""
    peer = adb_peer_factory(personality="modern")
    peer.read_delay = 0.05       # a slow device: only a host using the window has more than one WRTE out
    adb_cli.env["ADB_BURST_MODE"] = "1"
    adb_cli.connect(peer)
    assert "delayed_ack" in peer.events_of("cnxn")[0]
    payload = os.urandom(5_000_000)
    (tmp_path / "f.bin").write_bytes(payload)
    push = adb_cli.run("push", str(tmp_path / "f.bin"), str(peer.sandbox / "f.bin"), serial=peer.serial)
    assert push.returncode == 0, push.stderr
    assert (peer.sandbox / "f.bin").read_bytes() == payload
    assert peer.max_unacked > 1024 * 1024                      # more than one 1 MiB WRTE unacknowledged
    big = adb_cli.run("shell", "head -c 3000000 /dev/zero | tr '\\0' x; exit 4", serial=peer.serial)
    assert (big.returncode, big.stdout) == (4, "x" * 3_000_000)
    pulled = tmp_path / "back.bin"
    assert adb_cli.run("pull", str(peer.sandbox / "f.bin"), str(pulled), serial=peer.serial).returncode == 0
    assert pulled.read_bytes() == payload
    assert peer.events_of("refused") == []


def test_android_fixture_answers(adb_peer, adb_cli):
    adb_cli.connect(adb_peer)
    s = adb_peer.serial
    assert adb_cli.run("shell", "getprop ro.product.model", serial=s).stdout == "Pixel 6\n"
    assert adb_cli.run("shell", "getprop no.such.prop fallback", serial=s).stdout == "fallback\n"
    everything = adb_cli.run("shell", "getprop", serial=s).stdout
    assert "[ro.product.cpu.abi]: [arm64-v8a]\n" in everything
    adb_peer.set_prop("ro.build.version.sdk", "30")
    assert adb_cli.run("shell", "getprop ro.build.version.sdk", serial=s).stdout == "30\n"

    adb_peer.set_battery(level=42, voltage_mv=3871, temperature_c=31.7, charge_counter_uah=1234000)
    battery = adb_cli.run("shell", "dumpsys battery", serial=s).stdout
    for line in ("  level: 42\n", "  voltage: 3871\n", "  temperature: 317\n", "  Charge counter: 1234000\n"):
        assert line in battery
    unknown = adb_cli.run("shell", "dumpsys nosuchservice", serial=s)
    assert "Can't find service: nosuchservice" in unknown.stderr


def test_thermal_status_changes_while_a_command_runs(adb_peer, adb_cli):
    adb_cli.connect(adb_peer)
    script = ("dumpsys thermalservice | grep -e 'Thermal Status' -e 'mName=skin' | head -2; touch first-read; "
              "while [ ! -e heated ]; do sleep 0.02; done; "
              "dumpsys thermalservice | grep -e 'Thermal Status' -e 'mName=skin' | head -2")
    running = adb_cli.popen("shell", script, serial=adb_peer.serial)
    adb_peer.wait_for((adb_peer.sandbox / "first-read").exists, timeout=20, what="the first dumpsys")
    adb_peer.set_thermal(4)
    (adb_peer.sandbox / "heated").touch()
    out, err = running.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[0] == "Thermal Status: 0" and lines[2] == "Thermal Status: 4", out
    before = float(re.search(r"mValue=([\d.]+)", lines[1]).group(1))
    after = float(re.search(r"mValue=([\d.]+)", lines[3]).group(1))
    assert after > before


# ---------------------------------------------------------------------------
# 2. adb-shell


def test_adb_shell_library_session(adb_peer, adb_host_key, tmp_path):
    device = adb_shell_device(adb_peer, adb_host_key)
    try:
        assert device.shell("echo hi; echo err >&2") == "hi\nerr\n"      # shell v1: merged, no exit code
        payload = os.urandom(20_000)
        (tmp_path / "a.bin").write_bytes(payload)
        remote = str(adb_peer.sandbox / "dir" / "a.bin")
        device.push(str(tmp_path / "a.bin"), remote)
        assert Path(remote).read_bytes() == payload
        device.pull(remote, str(tmp_path / "b.bin"))
        assert (tmp_path / "b.bin").read_bytes() == payload
        mode, size, _ = device.stat(remote)
        assert size == 20_000 and mode & 0o170000 == 0o100000
        names = {entry.filename.decode() for entry in device.list(str(adb_peer.sandbox / "dir"))}
        assert names == {".", "..", "a.bin"}
        assert device.exec_out("printf 'a\\nb'") == "a\nb"

        with pytest.raises((AdbTimeoutError, TcpTimeoutException)):
            device.root(read_timeout_s=1)                 # an unknown service: adbd answers CLSE, adb-shell waits
        assert "root:" in adb_peer.events_of("unknown_service")
        adb_peer.faults.refuse = {"shell"}
        with pytest.raises((AdbTimeoutError, TcpTimeoutException)):
            device.shell("echo refused", read_timeout_s=1)
        assert adb_peer.events_of("refused") == ["shell:echo refused"]
        adb_peer.faults.refuse = set()
        assert device.shell("echo still usable") == "still usable\n"
    finally:
        device.close()


def test_adb_shell_library_auth_outcomes(adb_peer_factory, adb_host_key):
    signer = PythonRSASigner(adb_host_key.public_line, adb_host_key.private_pem)
    stranger = adb_peer_factory(authorized_keys=[])
    device = AdbDeviceTcp(stranger.host, stranger.port, default_transport_timeout_s=2)
    with pytest.raises((AdbTimeoutError, TcpTimeoutException)):
        device.connect(rsa_keys=[signer], auth_timeout_s=0.5)    # prompt pending: no CNXN ever comes
    device.close()
    rejected, prompt = stranger.events_of("auth")
    assert rejected == "signature rejected" and prompt.startswith("prompt pending")
    assert stranger.events_of("online") == []

    accepting = adb_peer_factory(authorized_keys=[], auto_accept=True)
    device = AdbDeviceTcp(accepting.host, accepting.port, default_transport_timeout_s=2)
    assert device.connect(rsa_keys=[signer], auth_timeout_s=2)
    assert device.shell("echo accepted") == "accepted\n"
    device.close()
    assert accepting.events_of("online") == ["public key accepted (auto_accept)"]


# ---------------------------------------------------------------------------
# 3. aarch64 under qemu


def test_aarch64_program_runs_under_qemu(adb_peer, adb_cli, aarch64_hello):
    with pytest.raises(OSError) as native:
        subprocess.run([str(aarch64_hello)], capture_output=True)
    assert native.value.errno == errno.ENOEXEC                       # the host cannot run it by itself
    assert adb_peer.qemu_enabled
    adb_cli.connect(adb_peer)
    s = adb_peer.serial
    assert adb_cli.run("push", str(aarch64_hello), str(adb_peer.sandbox / "bin" / "hello"), serial=s).returncode == 0

    rel = adb_cli.run("shell", "./bin/hello 7", serial=s)
    assert (rel.returncode, rel.stdout, rel.stderr) == (7, "hello from aarch64 argv0=./bin/hello\n", "stderr line\n")
    absolute = adb_cli.run("shell", f"{adb_peer.sandbox}/bin/hello 0 && echo ok", serial=s)
    assert absolute.stdout.splitlines() == [f"hello from aarch64 argv0={adb_peer.sandbox}/bin/hello", "ok"]
    on_path = adb_cli.run("shell", "PATH=$PWD/bin:$PATH hello 2", serial=s)
    assert (on_path.returncode, on_path.stdout) == (2, "hello from aarch64 argv0=hello\n")

    timed = adb_cli.run("shell", "toybox time -v ./bin/hello 5 64", serial=s)
    assert timed.returncode == 5
    assert timed.stdout == "hello from aarch64 argv0=./bin/hello\n"
    rss = re.search(r"^Max RSS \(KiB\): (\d+)$", timed.stderr, re.M)
    assert rss and int(rss.group(1)) >= 64 * 1024, timed.stderr      # it touched 64 MiB
    assert re.search(r"^Real time \(s\): \d+\.\d{6}$", timed.stderr, re.M)
    assert re.search(r"^User time \(s\): \d+\.\d{6}$", timed.stderr, re.M)
    assert re.search(r"^System time \(s\): \d+\.\d{6}$", timed.stderr, re.M)

    # The default emulated CPU has ARMv8.2 dot products; the program uses one when asked.
    assert adb_cli.run("shell", "./bin/hello 0 0 dotprod", serial=s).returncode == 0


def test_qemu_cpu_model_catches_newer_instructions(adb_peer_factory, adb_host_key, aarch64_hello):
    peer = adb_peer_factory(qemu_cpu="cortex-a53")
    shutil.copy(aarch64_hello, peer.sandbox / "hello")
    device = adb_shell_device(peer, adb_host_key)
    try:
        assert device.shell("./hello 0; echo rc=$?") == "hello from aarch64 argv0=./hello\nstderr line\nrc=0\n"
        # SIGILL (4) on a Cortex-A53: the shell reports 128+4.
        assert device.shell("./hello 0 0 dotprod; echo rc=$?").endswith("rc=132\n")
    finally:
        device.close()


# ---------------------------------------------------------------------------
# 4. faults


def test_push_dropped_midway_leaves_partial_file(adb_peer, adb_cli, tmp_path):
    adb_cli.connect(adb_peer)
    payload = os.urandom(1_000_000)
    (tmp_path / "big.bin").write_bytes(payload)
    remote = adb_peer.sandbox / "big.bin"
    adb_peer.faults.drop_send_after = 100_000
    push = adb_cli.run("push", str(tmp_path / "big.bin"), str(remote), serial=adb_peer.serial)
    assert push.returncode != 0 and "adb: error:" in push.stderr, push.stderr
    assert remote.read_bytes() == payload[:100_000]
    assert adb_peer.events_of("drop")


def test_drop_once_then_retry_with_adb_shell(adb_peer, adb_host_key, tmp_path):
    payload = os.urandom(20_000)
    (tmp_path / "m.bin").write_bytes(payload)
    remote = adb_peer.sandbox / "m.bin"
    adb_peer.faults.drop_send_after = 6_000
    adb_peer.faults.drop_send_times = 1
    device = adb_shell_device(adb_peer, adb_host_key)
    with pytest.raises(AdbTimeoutError):       # adb-shell reads EOF as "read 0 of 24 bytes" until read_timeout_s
        device.push(str(tmp_path / "m.bin"), str(remote), read_timeout_s=1)
    device.close()
    assert remote.read_bytes() == payload[:6_000]
    device = adb_shell_device(adb_peer, adb_host_key)              # reconnect, as a transport must
    try:
        device.push(str(tmp_path / "m.bin"), str(remote))
    finally:
        device.close()
    assert remote.read_bytes() == payload
    assert adb_peer.faults.drop_send_times == 0


def test_out_of_disk(adb_peer, adb_cli, adb_host_key, tmp_path):
    adb_cli.connect(adb_peer)
    s = adb_peer.serial
    (tmp_path / "big.bin").write_bytes(os.urandom(400_000))
    adb_peer.faults.disk_free = 150_000
    push = adb_cli.run("push", str(tmp_path / "big.bin"), str(adb_peer.sandbox / "big.bin"), serial=s)
    assert push.returncode != 0
    assert "No space left on device" in push.stderr
    assert not (adb_peer.sandbox / "big.bin").exists()             # adbd unlinks a file it could not finish
    df = adb_cli.run("shell", "df -k .", serial=s).stdout.splitlines()
    assert df[0].split()[:4] == ["Filesystem", "1K-blocks", "Used", "Available"]
    assert int(df[1].split()[3]) == 150_000 // 1024

    device = adb_shell_device(adb_peer, adb_host_key)
    try:
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(4_000))
        device.push(str(small), str(adb_peer.sandbox / "small.bin"))   # fits
        assert (adb_peer.sandbox / "small.bin").read_bytes() == small.read_bytes()
        with pytest.raises(PushFailedError, match="No space left on device"):
            device.push(str(tmp_path / "big.bin"), str(adb_peer.sandbox / "big2.bin"), read_timeout_s=2)
    finally:
        device.close()
    # adbd drains the rest of the transfer, then unlinks; adb-shell gave up at the FAIL already.
    adb_peer.wait_for(lambda: not (adb_peer.sandbox / "big2.bin").exists(), what="the partial file to go")

    adb_peer.faults.disk_free = None
    host_df = adb_cli.run("shell", "df -k .", serial=s).stdout
    assert "/dev/block/dm-7" not in host_df and host_df.startswith("Filesystem")


def test_low_memory_killer(adb_peer, adb_cli):
    adb_cli.connect(adb_peer)
    s = adb_peer.serial
    # the delay leaves the wrappers (toybox time, sh -c) time to spawn their child, even on a loaded machine
    adb_peer.faults.lmk = [LmkRule(r"sleep 3[0-9]", delay=1.0)]
    killed = adb_cli.run("shell", "sleep 31", serial=s, timeout=25)
    assert killed.returncode == 137                                  # shell v2 exit code of a SIGKILLed process
    timed = adb_cli.run("shell", "toybox time -v sleep 32; echo rc=$?", serial=s, timeout=25)
    assert timed.stdout == "rc=9\n"                                  # toybox passes WTERMSIG through
    assert "Max RSS (KiB):" in timed.stderr
    survivor = adb_cli.run("shell", "sh -c 'sleep 33; echo parent-survived'", serial=s, timeout=25)
    assert survivor.stdout == "parent-survived\n"                     # only the deepest match dies
    assert [cmd for _, cmd in adb_peer.lmk_kills] == ["sleep 31", "sleep 32", "sleep 33"]
    adb_peer.faults.lmk = []
    assert adb_cli.run("shell", "sleep 0.1; echo fine", serial=s).stdout == "fine\n"


def test_stall_refuse_and_rejected_keys(adb_peer_factory, adb_peer, adb_cli, adb_host_key):
    device = adb_shell_device(adb_peer, adb_host_key)
    try:
        adb_peer.faults.stall = {"shell": 2.0}
        with pytest.raises((AdbTimeoutError, TcpTimeoutException)):
            device.shell("echo late", read_timeout_s=0.5)
        adb_peer.faults.stall = {}
        assert adb_peer.events_of("stall")
    finally:
        device.close()

    adb_cli.connect(adb_peer)
    adb_peer.faults.refuse = {"sync:"}
    pull = adb_cli.run("pull", str(adb_peer.sandbox / "x"), "/dev/null", serial=adb_peer.serial)
    assert pull.returncode != 0
    adb_peer.faults.refuse = set()

    rejecting = adb_peer_factory(auto_accept=True)
    rejecting.faults.reject_keys = True
    connect = adb_cli.run("connect", rejecting.serial)
    assert "failed to authenticate" in connect.stdout
    assert adb_cli.wait_for_state(rejecting.serial, ("unauthorized",)) == "unauthorized"
    assert rejecting.events_of("online") == []


def test_sync_is_confined_to_the_sandbox(adb_peer, adb_cli, tmp_path):
    adb_cli.connect(adb_peer)
    (tmp_path / "f.bin").write_bytes(b"payload")
    outside = tmp_path / "outside" / "f.bin"
    push = adb_cli.run("push", str(tmp_path / "f.bin"), str(outside), serial=adb_peer.serial)
    assert push.returncode != 0 and "Permission denied" in push.stderr
    assert not outside.exists()
    escape = adb_peer.sandbox / "link"
    escape.symlink_to(tmp_path)
    push = adb_cli.run("push", str(tmp_path / "f.bin"), str(escape / "g.bin"), serial=adb_peer.serial)
    assert push.returncode != 0
    assert not (tmp_path / "g.bin").exists()
    assert adb_peer.events_of("sync_refused") == [str(outside), str(escape / "g.bin")]
