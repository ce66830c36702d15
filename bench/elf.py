"""Just enough of an ELF reader to tell what a binary runs on and which libraries it needs.

A runner folder may come from anywhere (``--runner-dir``), so the file is
untrusted: every offset and size is checked against the file before it is
read, and anything odd is a ``NotElf`` with a message saying what.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# e_machine values (the ELF specification's EM_* numbers)
MACHINES = {3: "x86", 40: "arm", 62: "x86-64", 183: "aarch64", 243: "riscv"}
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
_MAX_PHNUM = 4096
_MAX_DYNAMIC = 1 << 20
_MAX_STRTAB = 16 << 20


class NotElf(ValueError):
    """The file is not an ELF binary this reader understands."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str                  # "aarch64", "x86-64", ... or "machine <n>"
    bits: int                     # 32 or 64
    interpreter: str | None       # PT_INTERP: None for a static executable or a library
    needed: tuple[str, ...]       # DT_NEEDED sonames
    soname: str | None
    runpath: tuple[str, ...] = () # DT_RUNPATH (or the older DT_RPATH) entries

    @property
    def os(self) -> str:
        """"android" when the dynamic linker is Android's, "linux" otherwise."""
        return "android" if self.interpreter and self.interpreter.startswith("/system/bin/linker") else "linux"


def read_elf(path: Path) -> ElfInfo:
    with open(path, "rb") as fh:
        data_len = fh.seek(0, 2)
        fh.seek(0)

        def read(offset: int, size: int) -> bytes:
            if offset < 0 or size < 0 or offset + size > data_len:
                raise NotElf(f"{path}: truncated ELF file (wants bytes {offset}..{offset + size} "
                             f"of {data_len})")
            fh.seek(offset)
            return fh.read(size)

        ident = read(0, 16) if data_len >= 16 else b""
        if ident[:4] != b"\x7fELF":
            raise NotElf(f"{path}: not an ELF binary (starts with {ident[:4]!r})")
        bits = {1: 32, 2: 64}.get(ident[4])
        order = {1: "<", 2: ">"}.get(ident[5])
        if bits is None or order is None:
            raise NotElf(f"{path}: unknown ELF class {ident[4]} or byte order {ident[5]}")
        if bits == 64:
            hdr = read(16, 48)
            _type, machine, _ver, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = \
                struct.unpack(order + "HHIQQQIHHH", hdr[:42])
            ph_fmt, ph_min = order + "IIQQQQQQ", 56
        else:
            hdr = read(16, 36)
            _type, machine, _ver, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = \
                struct.unpack(order + "HHIIIIIHHH", hdr[:30])
            ph_fmt, ph_min = order + "IIIIIIII", 32
        if phnum > _MAX_PHNUM or (phnum and phentsize < ph_min):
            raise NotElf(f"{path}: implausible program header table ({phnum} x {phentsize} bytes)")
        segments = []
        for i in range(phnum):
            raw = read(phoff + i * phentsize, ph_min)
            if bits == 64:
                p_type, _pflags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack(ph_fmt, raw)
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _pflags, _align = struct.unpack(ph_fmt, raw)
            segments.append((p_type, p_offset, p_vaddr, p_filesz))

        interpreter = None
        for p_type, p_offset, _vaddr, p_filesz in segments:
            if p_type == _PT_INTERP:
                interpreter = read(p_offset, min(p_filesz, 4096)).split(b"\0")[0].decode("utf-8", "replace")

        needed: list[str] = []
        soname = None
        runpath: list[str] = []
        dynamic = [s for s in segments if s[0] == _PT_DYNAMIC]
        if dynamic:
            _t, d_offset, _v, d_size = dynamic[0]
            raw = read(d_offset, min(d_size, _MAX_DYNAMIC))
            entry = 16 if bits == 64 else 8
            fmt = order + ("qQ" if bits == 64 else "iI")
            entries = [struct.unpack(fmt, raw[i:i + entry]) for i in range(0, len(raw) - entry + 1, entry)]
            tags: dict[int, int] = {}
            for tag, value in entries:
                if tag == _DT_NULL:
                    break
                if tag in (_DT_STRTAB, _DT_STRSZ):
                    tags[tag] = value
            if _DT_STRTAB in tags:
                strtab = _file_offset(segments, tags[_DT_STRTAB], path)
                strsz = min(tags.get(_DT_STRSZ, 0), _MAX_STRTAB)
                table = read(strtab, strsz)

                def string(at: int) -> str:
                    if at >= len(table):
                        raise NotElf(f"{path}: dynamic string offset {at} beyond the string table")
                    return table[at:table.index(b"\0", at) if b"\0" in table[at:] else len(table)].decode(
                        "utf-8", "replace")

                for tag, value in entries:
                    if tag == _DT_NULL:
                        break
                    if tag == _DT_NEEDED:
                        needed.append(string(value))
                    elif tag == _DT_SONAME:
                        soname = string(value)
                    elif tag in (_DT_RPATH, _DT_RUNPATH):
                        runpath += [p for p in string(value).split(":") if p]
    return ElfInfo(MACHINES.get(machine, f"machine {machine}"), bits, interpreter, tuple(needed), soname,
                   tuple(runpath))


def _file_offset(segments, vaddr: int, path: Path) -> int:
    for p_type, p_offset, p_vaddr, p_filesz in segments:
        if p_type == _PT_LOAD and p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise NotElf(f"{path}: the dynamic string table address {vaddr:#x} is in no loaded segment")
