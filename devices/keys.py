"""The host's adb RSA keys, found and (only when missing) made the way adb does.

* The user key is ``$ANDROID_USER_HOME/adbkey`` when ``ANDROID_USER_HOME`` is
  set, otherwise ``~/.android/adbkey``: the same file the AOSP adb client uses,
  so a phone that already trusts this workstation trusts edgequant too.
* ``ADB_VENDOR_KEYS`` is a ``:``-separated list of private key files, or of
  folders whose ``*.adbkey`` files are keys; they are tried after the user key.
* When there is no user key, one is made with adb-shell's ``keygen`` (RSA
  2048): the private key is written 0600, the ``.pub`` beside it 0644, both
  under a temporary name first and renamed, under a lock.
"""

from __future__ import annotations

import base64
import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgequant.devices.transport import DeviceError

USER_KEY_NAME = "adbkey"
# What to do when a phone does not know our key (one line, after "device X is unauthorized: ").
UNAUTHORIZED_HINT = ('accept the "Allow USB debugging" prompt on the phone (tick "Always allow from this '
                     'computer") and retry')


def android_user_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("ANDROID_USER_HOME"):
        return Path(env["ANDROID_USER_HOME"]).expanduser()
    return Path(env.get("HOME") or Path.home()) / ".android"


def vendor_key_paths(env: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    found: list[Path] = []
    for part in (env.get("ADB_VENDOR_KEYS") or "").split(os.pathsep):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.name.endswith(".adbkey") and p.is_file())
        elif path.is_file():
            found.append(path)
    return found


@dataclass
class KeySigner:
    """One private key, with the two methods adb-shell's ``connect`` calls."""

    path: Path
    _key: object
    _public: bytes

    @classmethod
    def load(cls, path: Path) -> "KeySigner":
        from adb_shell.auth.keygen import encode_pubkey
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DeviceError("io", f"cannot read the adb key {path} ({exc}); fix or remove it") from None
        pub = path.with_name(path.name + ".pub")
        try:
            public = pub.read_bytes().strip()
        except OSError:
            # adb sends "<base64 key> <user>@<host>"; without a .pub file, derive it
            public = base64.b64encode(encode_pubkey(str(path))) + f" unknown@{socket.gethostname()}".encode()
        return cls(path, key, public)

    def Sign(self, data: bytes) -> bytes:  # noqa: N802 - adb-shell's signer interface
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        # adbd sends a 20-byte token and verifies it as a SHA-1 digest
        return self._key.sign(data, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))

    def GetPublicKey(self) -> bytes:  # noqa: N802
        return self._public


def ensure_user_key(env: dict[str, str] | None = None) -> Path:
    """The user's adb private key, made (0600, with its .pub) if there is none yet."""
    folder = android_user_dir(env)
    key = folder / USER_KEY_NAME
    if key.is_file():
        return key
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(folder / ".edgequant-adbkey.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not key.is_file():  # another process may have made it meanwhile
                _generate(key)
    except OSError as exc:
        raise DeviceError("io", f"cannot create an adb key in {folder} ({exc.strerror}); "
                                "set ANDROID_USER_HOME to a writable folder") from None
    return key


def _generate(key: Path) -> None:
    from adb_shell.auth.keygen import keygen

    tmp = Path(tempfile.mkdtemp(prefix=".adbkey-", dir=key.parent))  # mode 0700
    try:
        tmp_key = tmp / USER_KEY_NAME
        keygen(str(tmp_key))
        os.chmod(tmp_key, 0o600)
        os.chmod(tmp / (USER_KEY_NAME + ".pub"), 0o644)
        os.replace(tmp / (USER_KEY_NAME + ".pub"), key.with_name(key.name + ".pub"))
        os.replace(tmp_key, key)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()


def load_signers(env: dict[str, str] | None = None) -> list[KeySigner]:
    """The user key first (made if missing), then any ``ADB_VENDOR_KEYS``."""
    signers = [KeySigner.load(ensure_user_key(env))]
    for path in vendor_key_paths(env):
        if path != signers[0].path:
            signers.append(KeySigner.load(path))
    return signers
