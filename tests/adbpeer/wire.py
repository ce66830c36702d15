"""The ADB transport message: a 24-byte little-endian header and a payload.

Header words: command, arg0, arg1, data_length, data_check, magic
(``magic == command ^ 0xffffffff``).  ``data_check`` is the byte sum of the
payload (AOSP's ``calculate_apacket_checksum``; protocol.txt calls it a crc32,
it never was one).  Since protocol version ``A_VERSION_SKIP_CHECKSUM`` both
sides may leave it 0, so it is only computed and checked when the negotiated
version is older.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<6I")


def _cmd(name: bytes) -> int:
    return struct.unpack("<I", name)[0]


A_SYNC = _cmd(b"SYNC")
A_CNXN = _cmd(b"CNXN")
A_AUTH = _cmd(b"AUTH")
A_OPEN = _cmd(b"OPEN")
A_OKAY = _cmd(b"OKAY")
A_CLSE = _cmd(b"CLSE")
A_WRTE = _cmd(b"WRTE")
A_STLS = _cmd(b"STLS")
KNOWN_COMMANDS = {A_SYNC, A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_STLS}

A_VERSION_MIN = 0x01000000
A_VERSION_SKIP_CHECKSUM = 0x01000001
A_VERSION = 0x01000001

MAX_PAYLOAD_V1 = 4 * 1024      # what CNXN and AUTH are limited to before negotiation
MAX_PAYLOAD = 1024 * 1024      # adbd's own limit since Android 9
# delayed_ack: the window each side grants the other when a stream opens (AOSP adb.h)
INITIAL_DELAYED_ACK_BYTES = 32 * 1024 * 1024

# AUTH arg0
AUTH_TOKEN = 1
AUTH_SIGNATURE = 2
AUTH_RSAPUBLICKEY = 3
TOKEN_SIZE = 20


class ProtocolError(Exception):
    """The host sent something no adbd would accept; the connection is dropped."""


def checksum(data: bytes) -> int:
    """The byte sum, with numpy when it imports (adbd computes it in C; Python's ``sum()`` of a 1 MiB
    payload takes milliseconds, which would make every client speaking version 0x01000000 look slow)."""
    try:
        import numpy as np
    except ImportError:
        return sum(data) & 0xFFFFFFFF
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def command_name(command: int) -> str:
    raw = struct.pack("<I", command)
    return raw.decode("ascii") if raw.isalpha() else f"0x{command:08x}"


@dataclass(frozen=True)
class Message:
    command: int
    arg0: int
    arg1: int
    data: bytes = b""

    def pack(self, with_checksum: bool) -> bytes:
        check = checksum(self.data) if with_checksum else 0
        header = HEADER.pack(self.command, self.arg0, self.arg1, len(self.data), check,
                             self.command ^ 0xFFFFFFFF)
        return header + self.data

    def __repr__(self) -> str:
        return f"Message({command_name(self.command)}, {self.arg0}, {self.arg1}, {len(self.data)} bytes)"


def parse_header(raw: bytes, max_payload: int) -> tuple[int, int, int, int, int]:
    """(command, arg0, arg1, data_length, data_check) of a header, validated."""
    command, arg0, arg1, length, check, magic = HEADER.unpack(raw)
    if magic != command ^ 0xFFFFFFFF:
        raise ProtocolError(f"bad magic 0x{magic:08x} for command 0x{command:08x}")
    if command not in KNOWN_COMMANDS:
        raise ProtocolError(f"unknown command 0x{command:08x}")
    if length > max_payload:
        raise ProtocolError(f"{command_name(command)} payload of {length} bytes exceeds {max_payload}")
    return command, arg0, arg1, length, check
