"""Device-side logic that needs no device: exit-code markers, adb keys,
--device specs, work-directory safety, and the exit-code wrapper run by a
real POSIX shell (busybox sh, as on a Linux board, and the host's sh)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from edgequant.devices import exitcode, keys, push, select
from edgequant.devices.transport import DeviceError
from edgequant.core.errors import BadInput


# ---------------------------------------------------------------------------
# exit codes through the v1 shell


def run_wrapped(shell: str, command: str, pty: bool = False) -> tuple[bytes, str]:
    marker = exitcode.new_marker()
    out = subprocess.run([shell, "-c", exitcode.wrap(command, marker)], capture_output=True, timeout=30).stdout
    if pty:  # what an old adbd's pty does to the stream
        out = out.replace(b"\n", b"\r\n")
    return out, marker


SHELLS = [s for s in ("/bin/sh", shutil.which("busybox") and "busybox-sh") if s]


@pytest.fixture(params=SHELLS)
def shell(request, tmp_path):
    if request.param == "busybox-sh":
        link = tmp_path / "sh"
        link.symlink_to(shutil.which("busybox"))
        return str(link)
    return request.param


@pytest.mark.parametrize("pty", [False, True])
def test_exit_codes_and_output(shell, pty):
    out, marker = run_wrapped(shell, "echo hello; echo \"it's\"; exit 3", pty)
    res = exitcode.unwrap(out, marker, where="t")
    assert (res.exit_code, res.stdout) == (3, "hello\nit's\n")
    out, marker = run_wrapped(shell, "printf 'no newline'", pty)
    res = exitcode.unwrap(out, marker, where="t")
    assert (res.exit_code, res.stdout) == (0, "no newline")
    out, marker = run_wrapped(shell, "echo oops >&2; false", pty)
    assert exitcode.unwrap(out, marker, where="t").exit_code == 1


def test_output_cannot_forge_the_exit_code(shell):
    # the command prints a marker-like line and even its own guess of the marker format
    out, marker = run_wrapped(shell, "echo EQX0000000000000000:0; echo 'x'; exit 42")
    res = exitcode.unwrap(out, marker, where="t")
    assert res.exit_code == 42 and "EQX0000000000000000:0" in res.stdout


def test_quoting_survives_hostile_arguments(shell, tmp_path):
    from edgequant.devices.transport import quote

    name = tmp_path / "a b;$(touch pwned)'\"`x`"
    name.write_text("data")
    out, marker = run_wrapped(shell, f"cat {quote(name)}")
    res = exitcode.unwrap(out, marker, where="t")
    assert (res.exit_code, res.stdout) == (0, "data")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_missing_marker_is_one_line_error():
    with pytest.raises(DeviceError) as err:
        exitcode.unwrap(b"partial output, then the connection dropped", exitcode.new_marker(), where="device X")
    assert err.value.kind == "io" and "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# adb keys


def test_key_is_generated_0600_and_reused(tmp_path):
    env = {"ANDROID_USER_HOME": str(tmp_path / "android")}
    key = keys.ensure_user_key(env)
    assert key == tmp_path / "android" / "adbkey"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = key.with_name("adbkey.pub")
    assert pub.is_file() and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "android").stat().st_mode) == 0o700
    before = key.read_bytes()
    assert keys.ensure_user_key(env) == key and key.read_bytes() == before   # reused, not regenerated
    assert [p.name for p in (tmp_path / "android").iterdir() if p.name.startswith(".adbkey-")] == []


def test_signer_matches_the_public_key_adbd_would_store(tmp_path):
    """Sign a token like adbd's AUTH and verify it with the public key decoded from adbkey.pub."""
    import base64
    import struct

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    env = {"ANDROID_USER_HOME": str(tmp_path)}
    signer = keys.load_signers(env)[0]
    raw = base64.b64decode(signer.GetPublicKey().split()[0])
    words, _n0inv = struct.unpack_from("<II", raw)
    n = int.from_bytes(raw[8:8 + 256], "little")
    e = struct.unpack_from("<I", raw, 8 + 512)[0]
    assert words == 64 and e == 65537
    token = os.urandom(20)
    rsa.RSAPublicNumbers(e, n).public_key().verify(signer.Sign(token), token, padding.PKCS1v15(),
                                                   utils.Prehashed(hashes.SHA1()))


def test_vendor_keys_and_missing_pub(tmp_path):
    from adb_shell.auth.keygen import keygen

    vendor = tmp_path / "vendor"
    vendor.mkdir()
    keygen(str(vendor / "farm.adbkey"))
    (vendor / "farm.adbkey.pub").unlink()          # adb derives the public key when .pub is missing
    (vendor / "notes.txt").write_text("not a key")
    single = tmp_path / "single_key"
    keygen(str(single))
    env = {"ANDROID_USER_HOME": str(tmp_path / "user"),
           "ADB_VENDOR_KEYS": os.pathsep.join([str(vendor), str(single), str(tmp_path / "missing")])}
    signers = keys.load_signers(env)
    assert [s.path.name for s in signers] == ["adbkey", "farm.adbkey", "single_key"]
    assert signers[1].GetPublicKey().startswith(b"QAAAA")   # base64 of modulus_size_words = 64


def test_unreadable_key_is_one_line(tmp_path):
    (tmp_path / "adbkey").write_text("garbage")
    with pytest.raises(DeviceError) as err:
        keys.load_signers({"ANDROID_USER_HOME": str(tmp_path)})
    assert "adbkey" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# --device specs and the work directory


@pytest.mark.parametrize("spec, expected", [
    ("192.168.1.20:5555", select.Target("192.168.1.20:5555", "direct")),
    ("tcp:phone.lan:5037", select.Target("phone.lan:5037", "direct")),
    ("server:R58N123ABCD", select.Target("R58N123ABCD", "server")),
    ("server:10.0.0.5:7401", select.Target("10.0.0.5:7401", "server", connect=True)),
    ("emulator-5554", "serial:emulator-5554"),
    ("host", "host"),
    ("all", "all"),
])
def test_parse_spec(spec, expected):
    assert select.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["tcp:nohost", "server:a b", "x;rm -rf /", "$(id)", ""])
def test_bad_specs_are_one_line_bad_input(spec):
    with pytest.raises(BadInput) as err:
        select.parse_spec(spec)
    assert "\n" not in str(err.value)


def test_device_dir_option_env_default():
    assert select.device_dir(None, {}) == "/data/local/tmp/edgequant"
    assert select.device_dir(None, {"EDGEQUANT_DEVICE_DIR": "/home/linaro/eq/"}) == "/home/linaro/eq"
    assert select.device_dir("/opt/eq", {"EDGEQUANT_DEVICE_DIR": "/home/linaro/eq"}) == "/opt/eq"
    with pytest.raises(BadInput):
        select.device_dir("relative/dir", {})


@pytest.mark.parametrize("workdir", ["/", "/data", "/data/", "/data/local/tmp", "/sdcard", "/storage/emulated/0",
                                     "/data/local", "/tmp", "/foo", "/data/local/tmp/../../..", "/home"])
def test_dangerous_workdirs_are_refused(workdir):
    with pytest.raises(BadInput):
        push.check_workdir(workdir)


@pytest.mark.parametrize("workdir", ["/data/local/tmp/edgequant", "/home/linaro/edgequant", "/tmp/eq-test"])
def test_workdirs_that_are_fine(workdir):
    assert push.check_workdir(workdir) == workdir


def test_remote_names():
    sha = "ab" * 32
    assert push.remote_name("model-Q4_K_M.gguf", sha) == "abababababababab-model-Q4_K_M.gguf"
    for bad in ("../x", ".hidden", "a/b", "a b", ""):
        with pytest.raises(BadInput):
            push.remote_name(bad, sha)
