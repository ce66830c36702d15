"""What makes the peer look like a phone: properties, dumpsys texts, disk space.

The peer's shell has a fixture ``bin/`` folder first on ``PATH`` (see
``android_tool.py``).  This module writes that folder and the state files its
tools read, and renders the texts in the formats real Android prints, so the
code under test parses what it would parse on a phone.  Every setter rewrites
its file atomically (temporary name, then rename), so a test can change the
phone while a command runs (``set_thermal(status=4)`` mid-benchmark).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROPS: dict[str, str] = {
    "ro.product.name": "oriole",
    "ro.product.model": "Pixel 6",
    "ro.product.device": "oriole",
    "ro.product.brand": "google",
    "ro.product.manufacturer": "Google",
    "ro.product.board": "oriole",
    "ro.product.cpu.abi": "arm64-v8a",
    "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
    "ro.product.cpu.abilist64": "arm64-v8a",
    "ro.build.version.sdk": "34",
    "ro.build.version.release": "14",
    "ro.build.id": "AP2A.240805.005",
    "ro.build.type": "user",
    "ro.build.fingerprint": "google/oriole/oriole:14/AP2A.240805.005/12025142:user/release-keys",
    "ro.hardware": "oriole",
    "ro.board.platform": "gs101",
    "ro.soc.manufacturer": "Google",
    "ro.soc.model": "Tensor",
    "ro.debuggable": "0",
    "ro.secure": "1",
    "ro.adb.secure": "1",
    "sys.boot_completed": "1",
    "persist.sys.timezone": "Etc/UTC",
}

TOOL_NAMES = ("getprop", "dumpsys", "toybox", "df")

# android.os.Temperature TYPE_* values.
TYPE_CPU, TYPE_GPU, TYPE_BATTERY, TYPE_SKIN = 0, 1, 2, 3


@dataclass(frozen=True)
class Temperature:
    """One ``Temperature{...}`` line of ``dumpsys thermalservice``."""

    name: str
    value: float          # degrees Celsius
    type: int = TYPE_CPU
    status: int = 0       # throttling severity 0-6


def render_battery(*, level: int = 85, voltage_mv: int = 4186, temperature_c: float = 28.4,
                   charge_counter_uah: int = 2863000, status: int = 2, health: int = 2,
                   ac_powered: bool = False, usb_powered: bool = True, wireless_powered: bool = False,
                   technology: str = "Li-ion") -> str:
    """``dumpsys battery`` as Android 12-14 prints it (temperature in tenths of a degree)."""
    b = lambda v: "true" if v else "false"  # noqa: E731
    return ("Current Battery Service state:\n"
            f"  AC powered: {b(ac_powered)}\n"
            f"  USB powered: {b(usb_powered)}\n"
            f"  Wireless powered: {b(wireless_powered)}\n"
            "  Dock powered: false\n"
            "  Max charging current: 500000\n"
            "  Max charging voltage: 5000000\n"
            f"  Charge counter: {charge_counter_uah}\n"
            f"  status: {status}\n"
            f"  health: {health}\n"
            "  present: true\n"
            f"  level: {level}\n"
            "  scale: 100\n"
            f"  voltage: {voltage_mv}\n"
            f"  temperature: {round(temperature_c * 10)}\n"
            f"  technology: {technology}\n")


def default_temperatures(status: int) -> list[Temperature]:
    """Sensors that warm up with the thermal status, as a throttling phone's do."""
    return [
        Temperature("cpu0-silver-usr", 45.0 + 8 * status, TYPE_CPU, 0),
        Temperature("cpu2-mid-usr", 47.5 + 8 * status, TYPE_CPU, 0),
        Temperature("cpu4-big-usr", 50.0 + 9 * status, TYPE_CPU, 0),
        Temperature("gpu", 42.0 + 6 * status, TYPE_GPU, 0),
        Temperature("battery", 28.0 + 2 * status, TYPE_BATTERY, 0),
        Temperature("skin", 31.0 + 4 * status, TYPE_SKIN, status),
    ]


def _fmt_temp(t: Temperature) -> str:
    return f"\tTemperature{{mValue={t.value:.1f}, mType={t.type}, mName={t.name}, mStatus={t.status}}}\n"


def render_thermalservice(status: int = 0, temperatures: list[Temperature] | None = None) -> str:
    """``dumpsys thermalservice`` as Android 11-14 prints it."""
    temps = default_temperatures(status) if temperatures is None else temperatures
    skin = [t for t in temps if t.type == TYPE_SKIN]
    return ("IsStatusOverride: false\n"
            "ThermalEventListeners:\n\tcallbacks: 1\n\tkilled: false\n\tbroadcasts count: -1\n"
            "ThermalStatusListeners:\n\tcallbacks: 1\n\tkilled: false\n\tbroadcasts count: -1\n"
            f"Thermal Status: {status}\n"
            "Cached temperatures:\n" + "".join(_fmt_temp(t) for t in skin)
            + "HAL Ready: true\n"
            "HAL connection:\n\tThermalHAL AIDL 1  connected: yes\n"
            "Current temperatures from HAL:\n" + "".join(_fmt_temp(t) for t in temps)
            + "Current cooling devices from HAL:\n"
            "\tCoolingDevice{mValue=0, mType=2, mName=thermal-cpufreq-0}\n"
            "\tCoolingDevice{mValue=0, mType=2, mName=thermal-cpufreq-4}\n")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AndroidFixtures:
    """The fixture ``bin/`` folder and its state, under ``root`` (outside the sandbox)."""

    def __init__(self, root: Path, props: dict[str, str]):
        self.root = root
        self.bin = root / "bin"
        self.state = root / "state"
        self._lock = threading.Lock()
        self._props = dict(props)
        self.bin.mkdir(parents=True, exist_ok=True)
        (self.state / "dumpsys").mkdir(parents=True, exist_ok=True)
        self._install_tools()
        self._write_props()
        self.set_battery()
        self.set_thermal(0)

    def _install_tools(self) -> None:
        source = Path(__file__).with_name("android_tool.py").read_text()
        host_df = ""
        for candidate in ("/usr/bin/df", "/bin/df"):
            if os.path.exists(candidate):
                host_df = candidate
                break
        source = source.replace('STATE = os.environ.get("ADBPEER_STATE", "")', f"STATE = {str(self.state)!r}", 1)
        source = source.replace('HOST_DF = ""', f"HOST_DF = {host_df!r}", 1)
        script = f"#!{sys.executable} -IS\n" + source
        for name in TOOL_NAMES:
            path = self.bin / name
            path.write_text(script)
            path.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)

    # -- properties ---------------------------------------------------------
    @property
    def props(self) -> dict[str, str]:
        with self._lock:
            return dict(self._props)

    def set_prop(self, key: str, value: str) -> None:
        with self._lock:
            self._props[key] = str(value)
            self._write_props_locked()

    def _write_props(self) -> None:
        with self._lock:
            self._write_props_locked()

    def _write_props_locked(self) -> None:
        _atomic_write(self.state / "props.json", json.dumps(self._props, indent=1, sort_keys=True))

    # -- dumpsys ------------------------------------------------------------
    def set_dumpsys(self, service: str, text: str | None) -> None:
        """Raw text for ``dumpsys SERVICE``; ``None`` removes the service."""
        path = self.state / "dumpsys" / f"{service}.txt"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write(path, text)

    def set_battery(self, **fields) -> None:
        """``dumpsys battery`` from :func:`render_battery` keyword fields."""
        self.set_dumpsys("battery", render_battery(**fields))

    def set_thermal(self, status: int, temperatures: list[Temperature] | None = None) -> None:
        """``dumpsys thermalservice`` with ``Thermal Status: status`` (0-6)."""
        self.set_dumpsys("thermalservice", render_thermalservice(status, temperatures))

    # -- disk ---------------------------------------------------------------
    def set_disk(self, free: int | None, total: int = 64 * 1024**3, filesystem: str = "/dev/block/dm-7",
                 mount: str = "/data") -> None:
        """Make ``df`` report ``free`` bytes available; ``None``: the host's real df."""
        path = self.state / "disk.json"
        if free is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write(path, json.dumps({"free": int(free), "total": int(total),
                                            "filesystem": filesystem, "mount": mount}))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
