"""pytest fixtures for the ADB peer (imported into tests/conftest.py).

adb_host_key       HostKey: an RSA-2048 key pair for the test's "host", written as
                   the AOSP client keeps it (HOME/.android/adbkey, mode 0600, and
                   adbkey.pub); ``public_line``/``private_pem`` feed adb-shell's
                   ``PythonRSASigner(pub, priv)``.
adb_peer_factory   make_peer(**AdbPeer kwargs) -> a started AdbPeer; the sandbox
                   defaults to tmp_path/"device" ("device-2", ... for more peers)
                   and authorized_keys to [adb_host_key.public_line].  Every peer
                   is closed at teardown, and teardown fails if the peer recorded
                   internal errors.
adb_peer           adb_peer_factory() with the defaults.
adb_cli            AdbCli: the real AOSP ``adb`` client from adbutils' wheel with a
                   private server port, HOME at adb_host_key.home, mDNS/USB/emulator
                   scanning off, the server log under tmp_path; the server is killed
                   at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from .keys import HostKey, write_host_key
from .peer import AdbPeer


def aosp_adb_binary() -> Path:
    spec = importlib.util.find_spec("adbutils")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("adbutils is not installed; it ships the AOSP adb client used by these tests")
    return Path(list(spec.submodule_search_locations)[0]) / "binaries" / "adb"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class AdbCli:
    """Runs the AOSP adb client against a private adb server."""

    binary: Path
    home: Path
    server_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, home: Path, log_path: Path) -> AdbCli:
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("ANDROID_SERIAL", "ADB_SERVER_SOCKET", "ADB_VENDOR_KEYS", "ADB_TRACE",
                            "ANDROID_ADB_SERVER_ADDRESS")}
        env.update(HOME=str(home), ANDROID_USER_HOME=str(home / ".android"), ANDROID_ADB_SERVER_PORT=str(port),
                   ANDROID_ADB_LOG_PATH=str(log_path), ADB_MDNS="0", ADB_MDNS_AUTO_CONNECT="0",
                   ADB_MDNS_OPENSCREEN="0", ADB_EMU="0", ADB_LIBUSB="0", ADB_USB="0")
        return cls(binary=aosp_adb_binary(), home=home, server_port=port, log_path=log_path, env=env)

    def command(self, *args: str, serial: str | None = None) -> list[str]:
        return [str(self.binary), "-P", str(self.server_port), *(["-s", serial] if serial else []), *args]

    def run(self, *args: str, serial: str | None = None, timeout: float = 30, input: bytes | str | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
        if isinstance(input, str) and not text:
            input = input.encode()
        return subprocess.run(self.command(*args, serial=serial), env=self.env, capture_output=True, text=text,
                              timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args: str, serial: str | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args, serial=serial), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def devices(self) -> dict[str, str]:
        """serial -> state, from ``adb devices``."""
        out = self.run("devices").stdout
        states = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                states[parts[0]] = parts[1]
        return states

    def wait_for_state(self, serial: str, states: tuple[str, ...] = ("device",), timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.devices().get(serial)
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"{serial} never reached {states} (last state: {state})")

    def connect(self, peer: AdbPeer, states: tuple[str, ...] = ("device",)) -> subprocess.CompletedProcess:
        """``adb connect`` the peer and wait until the server lists it in one of ``states``."""
        result = self.run("connect", peer.serial)
        self.wait_for_state(peer.serial, states)
        return result

    def kill_server(self) -> None:
        try:
            self.run("kill-server", timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while _port_open(self.server_port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _port_open(self.server_port):
            self._kill_server_process()

    def _kill_server_process(self) -> None:
        """Last resort: the server process started for this port, found by its own command line."""
        needle = f"tcp:{self.server_port}".encode()
        binary = os.path.realpath(self.binary)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
            if exe == binary and needle in argv and b"fork-server" in argv:
                try:
                    os.kill(int(entry), 9)
                except OSError:
                    pass


@pytest.fixture
def adb_host_key(tmp_path: Path) -> HostKey:
    return write_host_key(tmp_path / "host-home")


_DEFAULT = object()


@pytest.fixture
def adb_peer_factory(tmp_path: Path, adb_host_key: HostKey) -> Callable[..., AdbPeer]:
    peers: list[AdbPeer] = []

    def make_peer(sandbox: Path | None = None, *, authorized_keys=_DEFAULT, **kwargs) -> AdbPeer:
        if sandbox is None:
            sandbox = tmp_path / ("device" if not peers else f"device-{len(peers) + 1}")
        keys = [adb_host_key.public_line] if authorized_keys is _DEFAULT else authorized_keys
        peer = AdbPeer(sandbox, authorized_keys=keys, **kwargs).start()
        peers.append(peer)
        return peer

    yield make_peer
    errors = []
    for peer in peers:
        peer.close()
        errors.extend(peer.errors)
    assert not errors, "adbpeer internal errors:\n" + "\n".join(errors)


@pytest.fixture
def adb_peer(adb_peer_factory) -> AdbPeer:
    return adb_peer_factory()


@pytest.fixture
def adb_cli(tmp_path: Path, adb_host_key: HostKey) -> AdbCli:
    cli = AdbCli.create(adb_host_key.home, tmp_path / "adb-server.log")
    yield cli
    cli.kill_server()
