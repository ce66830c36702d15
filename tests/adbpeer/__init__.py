"""adbpeer: the device side of ADB, in Python, for testing edgequant without phones.

What is real ADB here
    The wire protocol, byte for byte, as AOSP adbd speaks it over TCP: 24-byte
    message headers, the CNXN banner with features, RSA AUTH (random token,
    PKCS#1 v1.5/SHA-1 signature checked against ``adb_keys`` lines in Android's
    public-key format, the RSAPUBLICKEY prompt), OPEN/OKAY/WRTE/CLSE streams
    with one-WRTE-in-flight flow control (or AOSP's delayed acks, when both
    sides offer ``delayed_ack``) and many concurrent streams, the
    shell v2 protocol (separate stdout/stderr, exit codes, close-stdin,
    window size), shell v1/exec on a raw pty, and the sync v1 protocol
    (STAT, LIST, SEND, RECV, QUIT).  The AOSP ``adb`` client and adb-shell talk
    to it as to a phone.  Commands really run (``/bin/sh -c`` on this host,
    cwd = the sandbox, like adbd on a Linux board), files really land on disk,
    aarch64 binaries really execute (under qemu-aarch64-static, see qemu.py).

What is fixture
    The Android answers: ``getprop``, ``dumpsys battery``/``thermalservice``
    (and any other dumpsys text a test sets), ``toybox time`` (real
    measurement, toybox's output format) and ``df`` (when a disk size is set)
    come from a fixture ``bin/`` folder first on the shell's PATH
    (android_tool.py), fed by state the test can change at any moment
    (android.py).  Host paths stand in for device paths, and sync is confined
    to the sandbox.  Faults (peer.Faults) stand in for flaky phones: dropped
    connections mid-push, stalled or refused services, rejected keys, a full
    disk, a low-memory killer, small packets and small socket buffers.
    Personalities (peer.Personality) stand in for the daemons phones really
    run: "legacy" ends every stream with CLSE(0, id), announces 4 KiB payloads
    and protocol version 0x01000000 (checksums), and has no shell v2 and no
    ``exec:``; "modern" offers delayed acks.

What is not implemented
    TLS (``adb pair``/STLS), sync v2 (sendrecv_v2, stat_v2,
    ls_v2; not advertised, so clients fall back to v1), compression, abb/cmd
    (no package manager), jdwp, reverse/forward, root/remount/reboot (those
    services are refused with CLSE, as unknown services are).

Entry points: ``AdbPeer`` (peer.py), ``Faults``/``LmkRule``, ``HostKey`` and
``write_host_key`` (keys.py); pytest fixtures in ``adbpeer.pytest_fixtures``.
"""

from .android import DEFAULT_PROPS, Temperature, render_battery, render_thermalservice
from .keys import HostKey, decode_android_pubkey, encode_android_pubkey, write_host_key
from .peer import DEFAULT_FEATURES, PERSONALITIES, AdbPeer, Faults, LmkRule, Personality

__all__ = [
    "AdbPeer", "Faults", "LmkRule", "DEFAULT_FEATURES", "PERSONALITIES", "Personality", "DEFAULT_PROPS", "HostKey",
    "write_host_key",
    "encode_android_pubkey", "decode_android_pubkey", "Temperature", "render_battery", "render_thermalservice",
]
