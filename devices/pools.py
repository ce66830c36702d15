"""Device pools: a TOML file (``profiles/pool.toml`` is the template) listing device specs with optional
labels (they name the phones in the live view and the summary) and work directories (a board without
``/data`` needs another one than the phones); ``--device pool:NAME|PATH`` expands to its phones.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgequant.core.errors import BadInput
from edgequant.devices import select


@dataclass(frozen=True)
class PoolDevice:
    spec: str
    label: str | None = None
    device_dir: str | None = None     # this phone's work directory instead of --device-dir


@dataclass(frozen=True)
class Pool:
    name: str
    path: Path
    description: str
    devices: tuple[PoolDevice, ...]


_POOL_KEYS = {"pool": ("name", "description"), "device": ("spec", "label", "device_dir")}


def builtin_pools() -> list[str]:
    names = []
    for p in resources.files("edgequant.profiles").iterdir():
        if p.name.endswith(".toml") and "pool" in tomllib.loads(p.read_text(encoding="utf-8")):
            names.append(p.name[:-5])
    return sorted(names)


def load_pool(name_or_path: str) -> Pool:
    """A device pool by built-in name (a TOML in ``profiles/`` with a ``[pool]`` table) or path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or "/" in name_or_path or path.exists()):
        if name_or_path not in builtin_pools():
            raise BadInput(f"device pool '{name_or_path}' not found; built-in pools: "
                           f"{', '.join(builtin_pools()) or 'none'}, or pass a path to a pool .toml file")
        path = Path(str(resources.files("edgequant.profiles") / f"{name_or_path}.toml"))
    if not path.is_file():
        raise BadInput(f"device pool {path}: no such file; pass pool:NAME or pool:PATH to a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"device pool {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"device pool {path}: cannot be read: {exc}") from None
    return parse_pool(data, path)


def parse_pool(data: dict[str, Any], path: Path) -> Pool:
    def fail(where: str, message: str) -> BadInput:
        return BadInput(f"device pool {path}: {where} {message}")

    for key in data:
        if key not in _POOL_KEYS:
            raise fail(f"[{key}]", f"is not a pool section; allowed: [pool], [[device]]")
    head = data.get("pool")
    if not isinstance(head, dict):
        raise fail("[pool]", "is missing: a pool file starts with [pool] and name = \"...\"")
    for key in head:
        if key not in _POOL_KEYS["pool"]:
            raise fail(f"pool.{key}", f"is not a pool field; allowed: {', '.join(_POOL_KEYS['pool'])}")
    name = head.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("pool.name", "must be a non-empty string")
    entries = data.get("device", [])
    if not isinstance(entries, list) or not entries:
        raise fail("[[device]]", "is missing: list at least one device (spec = \"SERIAL\" or \"HOST:PORT\")")
    devices = []
    for i, entry in enumerate(entries):
        where = f"device[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table with spec and an optional label")
        for key in entry:
            if key not in _POOL_KEYS["device"]:
                raise fail(f"{where}.{key}", f"is not a device field; allowed: {', '.join(_POOL_KEYS['device'])}")
        spec, label = entry.get("spec"), entry.get("label")
        if not isinstance(spec, str) or not spec.strip():
            raise fail(f"{where}.spec", "must be a device spec string (SERIAL, HOST:PORT, server:SERIAL or all)")
        if spec.strip() == "host" or spec.strip().startswith("pool:"):
            raise fail(f"{where}.spec", f"must name a phone, got {spec!r}")
        try:
            select.parse_spec(spec)
        except BadInput as exc:
            raise fail(f"{where}.spec", f"is not a device spec ({exc})") from None
        if label is not None and (not isinstance(label, str) or len(label) > 80):
            raise fail(f"{where}.label", "must be a string of at most 80 characters")
        device_dir = entry.get("device_dir")
        if device_dir is not None:
            try:
                device_dir = select.device_dir(device_dir if isinstance(device_dir, str) else "?")
            except BadInput as exc:
                raise fail(f"{where}.device_dir", str(exc)) from None
        devices.append(PoolDevice(spec.strip(), label, device_dir))
    return Pool(name, path, str(head.get("description", "")), tuple(devices))
