"""ADB's RSA keys: the Android public-key format, token signatures, host key pairs.

An ``adb_keys`` line (and ``~/.android/adbkey.pub``) is the base64 of a
524-byte ``RSAPublicKey`` struct (AOSP ``libcrypto_utils/android_pubkey``)
followed by `` user@host``:

    uint32 modulus_size_words   (64 for RSA-2048)
    uint32 n0inv                (-1 / n mod 2**32)
    uint8  modulus[256]         (little-endian)
    uint8  rr[256]              ((2**2048)**2 mod n, little-endian)
    uint32 exponent

The host answers an AUTH TOKEN (20 random bytes) with ``RSA_sign(NID_sha1,
token)``: PKCS#1 v1.5 over the token used directly as a SHA-1 digest.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

MODULUS_BYTES = 256
MODULUS_WORDS = MODULUS_BYTES // 4
ENCODED_SIZE = 4 + 4 + MODULUS_BYTES + MODULUS_BYTES + 4


class KeyFormatError(ValueError):
    pass


def encode_android_pubkey(key: rsa.RSAPublicKey, comment: str = "adbpeer@host") -> str:
    """The ``adbkey.pub`` / ``adb_keys`` line for ``key``."""
    numbers = key.public_numbers()
    n, e = numbers.n, numbers.e
    if n.bit_length() > MODULUS_BYTES * 8:
        raise KeyFormatError("ADB keys are RSA-2048")
    n0inv = (-pow(n, -1, 1 << 32)) % (1 << 32)
    rr = pow(1 << (MODULUS_BYTES * 8), 2, n)
    raw = (struct.pack("<II", MODULUS_WORDS, n0inv) + n.to_bytes(MODULUS_BYTES, "little")
           + rr.to_bytes(MODULUS_BYTES, "little") + struct.pack("<I", e))
    return base64.b64encode(raw).decode("ascii") + (f" {comment}" if comment else "")


def decode_android_pubkey(line: str | bytes) -> rsa.RSAPublicKey:
    """Parse an ``adb_keys`` line (key, optional comment, optional trailing NUL)."""
    if isinstance(line, bytes):
        line = line.split(b"\0", 1)[0].decode("ascii", "replace")
    fields = line.strip().split()
    if not fields:
        raise KeyFormatError("empty key")
    try:
        raw = base64.b64decode(fields[0], validate=True)
    except binascii.Error as exc:
        raise KeyFormatError(f"invalid base64: {exc}") from None
    if len(raw) != ENCODED_SIZE:
        raise KeyFormatError(f"key is {len(raw)} bytes, expected {ENCODED_SIZE}")
    words, n0inv = struct.unpack_from("<II", raw, 0)
    if words != MODULUS_WORDS:
        raise KeyFormatError(f"modulus_size_words {words}, expected {MODULUS_WORDS}")
    n = int.from_bytes(raw[8:8 + MODULUS_BYTES], "little")
    (e,) = struct.unpack_from("<I", raw, 8 + 2 * MODULUS_BYTES)
    if n % 2 == 0 or n0inv != (-pow(n, -1, 1 << 32)) % (1 << 32):
        raise KeyFormatError("inconsistent modulus / n0inv")
    return rsa.RSAPublicNumbers(e, n).public_key()


def verify_token_signature(key: rsa.RSAPublicKey, token: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, token, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_token(key: rsa.RSAPrivateKey, token: bytes) -> bytes:
    """What an ADB host sends as AUTH SIGNATURE (used by the peer's own tests)."""
    return key.sign(token, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))


_KEY_CACHE: list[rsa.RSAPrivateKey] = []


def generate_private_key(*, reuse: bool = True) -> rsa.RSAPrivateKey:
    """An RSA-2048 key; with ``reuse`` one key per process (keygen costs ~0.1-1 s)."""
    if reuse and _KEY_CACHE:
        return _KEY_CACHE[0]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if reuse:
        _KEY_CACHE.append(key)
    return key


@dataclass(frozen=True)
class HostKey:
    """A host-side ADB key pair on disk, as the AOSP client keeps it.

    ``home`` is the directory to use as ``$HOME`` (the key pair lives in
    ``home/.android/adbkey{,.pub}``); ``private_pem``/``public_line`` are the
    file contents, ready for ``adb_shell``'s ``PythonRSASigner(pub, priv)``.
    """

    home: Path
    private_path: Path
    public_path: Path
    private_pem: str
    public_line: str
    key: rsa.RSAPrivateKey

    @property
    def android_dir(self) -> Path:
        return self.private_path.parent


def write_host_key(home: Path, key: rsa.RSAPrivateKey | None = None,
                   comment: str = "edgequant-test@host") -> HostKey:
    """Write ``home/.android/adbkey`` (PKCS#8 PEM, mode 0600) and ``adbkey.pub``."""
    key = key or generate_private_key()
    android_dir = home / ".android"
    android_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(android_dir, 0o750)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode("ascii")
    public_line = encode_android_pubkey(key.public_key(), comment)
    private_path = android_dir / "adbkey"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pem)
    os.chmod(private_path, 0o600)
    public_path = android_dir / "adbkey.pub"
    public_path.write_text(public_line + "\n")
    return HostKey(home=home, private_path=private_path, public_path=public_path,
                   private_pem=pem, public_line=public_line, key=key)
