"""A phone's health around each measurement: thermal status, temperatures, battery.

Before each rung edgequant reads the thermal status (Android's
``PowerManager`` levels, 0 none … 6 shutdown, from ``dumpsys
thermalservice``), the temperatures (the thermal HAL's, else the readable
``/sys/class/thermal`` zones) and the battery level and temperature, and
waits for the phone to cool down: until the thermal status is at most
``max_status`` and the watched temperature at most ``max_celsius``, polling
every ``poll_s`` seconds for at most ``max_wait_s``.  The watched temperature
is the battery's when the phone reports one (it follows the skin and is what
phone benchmarks, e.g. ExecuTorch's, watch), else the hottest sensor.

After the rung the status is read again: a run is **throttled** when the
thermal status rose during it, or when the cool-down gave up before the
phone was cool.  Both readings, the wait and the flag are stored with the
rung's rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from edgequant.devices.facts import HEALTH_SECTIONS, DeviceFacts, collect_facts
from edgequant.devices.transport import Transport
from edgequant.profiles import CoolDown  # the policy is declarative: it lives with the profile


@dataclass(frozen=True)
class Health:
    thermal_status: int | None
    celsius: float | None          # the watched temperature (see the module doc)
    sensor: str | None             # which one
    battery_level: int | None
    battery_celsius: float | None
    ram_available_kib: int | None
    at: float

    @classmethod
    def from_facts(cls, f: DeviceFacts, at: float) -> "Health":
        if f.battery_celsius is not None:
            celsius, sensor = f.battery_celsius, "battery"
        else:
            hottest = max(f.temperatures, key=lambda t: t.celsius, default=None)
            celsius, sensor = (hottest.celsius, hottest.name) if hottest else (None, None)
        return cls(f.thermal_status, celsius, sensor, f.battery_level, f.battery_celsius, f.ram_available_kib, at)

    def cool_enough(self, policy: CoolDown) -> bool:
        status_ok = self.thermal_status is None or self.thermal_status <= policy.max_status
        temp_ok = self.celsius is None or self.celsius <= policy.max_celsius
        return status_ok and temp_ok

    def describe(self) -> str:
        parts = []
        if self.thermal_status is not None:
            parts.append(f"thermal status {self.thermal_status}")
        if self.celsius is not None:
            parts.append(f"{self.celsius:.1f} °C ({self.sensor})")
        if self.battery_level is not None:
            parts.append(f"battery {self.battery_level}%")
        return ", ".join(parts) or "no thermal or battery readings"

    def to_dict(self) -> dict:
        return {"thermal_status": self.thermal_status, "celsius": self.celsius, "sensor": self.sensor,
                "battery_level": self.battery_level, "battery_celsius": self.battery_celsius,
                "ram_available_kib": self.ram_available_kib}


def read_health(transport: Transport, workdir: str, clock: Callable[[], float] = time.time) -> Health:
    """One shell round-trip: thermal status, temperatures, battery, available RAM."""
    facts = collect_facts(transport, workdir, timeout=60, sections=HEALTH_SECTIONS)
    return Health.from_facts(facts, clock())


@dataclass(frozen=True)
class CoolDownResult:
    health: Health                 # the last reading, taken just before the run starts
    waited_s: float
    cooled: bool                   # False: gave up after max_wait_s


def wait_cool(transport: Transport, workdir: str, policy: CoolDown, *,
              sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
              on_wait: Callable[[Health, float], None] | None = None) -> CoolDownResult:
    """Poll until the phone is cool enough by ``policy`` or ``max_wait_s`` has passed."""
    start = clock()
    while True:
        health = read_health(transport, workdir)
        waited = clock() - start
        if health.cool_enough(policy):
            return CoolDownResult(health, waited, True)
        if waited >= policy.max_wait_s:
            return CoolDownResult(health, waited, False)
        if on_wait is not None:
            on_wait(health, waited)
        sleep(min(policy.poll_s, max(policy.max_wait_s - waited, 0.0)) or policy.poll_s)


def throttled(before: CoolDownResult, after: Health) -> bool:
    """The thermal status rose during the run, or the phone never cooled down before it."""
    rose = (before.health.thermal_status is not None and after.thermal_status is not None
            and after.thermal_status > before.health.thermal_status)
    return rose or not before.cooled
