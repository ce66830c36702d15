"""The host as a device: what a measurement row says about the machine it ran on."""

from __future__ import annotations

import platform
import socket
from functools import lru_cache


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def host_device() -> dict:
    import psutil

    return {
        "kind": "host",
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "arch": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def host_device_id() -> str:
    return f"host:{socket.gethostname()}"
