"""What a phone (or a Linux board) is: gathered in one shell round-trip, parsed defensively.

:func:`facts_script` prints every source in its own section, delimited by a
line that carries a random nonce; :func:`split_sections` cuts the output
apart and the ``parse_*`` functions read one section each.  They are pure
functions of untrusted text: bounded regexes, no evaluation, unknown or
garbled lines skipped, every value optional.  :func:`collect_facts` is the one
function here that talks to a device.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass, field

from edgequant.devices.measured import MAX_TEXT_CHARS, DeviceOutputError, bounded
from edgequant.devices.transport import Transport, quote

ARM64_ABIS = ("arm64-v8a", "aarch64")
THERMAL_STATUS = {0: "none", 1: "light", 2: "moderate", 3: "severe", 4: "critical", 5: "emergency",
                  6: "shutdown"}
MAX_VALUE = 200          # longest string value kept from the device


def _clip(value: str | None) -> str | None:
    if value is None:
        return None
    value = "".join(ch for ch in value.strip() if ch.isprintable())
    return value[:MAX_VALUE] or None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d{1,18}", text) else None


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# ---------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Cluster:
    cpus: tuple[int, ...]
    max_khz: int | None


@dataclass(frozen=True)
class Temperature:
    name: str
    celsius: float


@dataclass
class DeviceFacts:
    serial: str
    transport: str
    model: str | None = None
    manufacturer: str | None = None
    soc: str | None = None
    abi: str | None = None
    abis: list[str] = field(default_factory=list)
    android_release: str | None = None
    sdk: int | None = None
    ram_total_kib: int | None = None
    ram_available_kib: int | None = None
    clusters: list[Cluster] = field(default_factory=list)
    cpu_count: int | None = None
    workdir: str | None = None
    workdir_free_kib: int | None = None
    workdir_writable: bool | None = None     # the work directory, or the folder it would be made in
    thermal_status: int | None = None
    temperatures: list[Temperature] = field(default_factory=list)
    battery_level: int | None = None
    battery_celsius: float | None = None
    battery_mv: int | None = None
    battery_powered: list[str] = field(default_factory=list)

    @property
    def is_arm64(self) -> bool:
        return any(a in ARM64_ABIS for a in ([self.abi] if self.abi else []) + self.abis)

    @property
    def thermal_status_name(self) -> str | None:
        return None if self.thermal_status is None else THERMAL_STATUS.get(self.thermal_status,
                                                                            str(self.thermal_status))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clusters"] = [{"cpus": list(c.cpus), "max_khz": c.max_khz} for c in self.clusters]
        d["temperatures"] = [{"name": t.name, "celsius": t.celsius} for t in self.temperatures]
        d["thermal_status_name"] = self.thermal_status_name
        d["recommended_threads"] = recommended_threads(self)
        return d


# ---------------------------------------------------------------------------
# parsers, one per source


_PROP = re.compile(r"\[([A-Za-z0-9_.\-:@]{1,256})\]: \[(.*)\]")


def parse_getprop(text: str) -> dict[str, str]:
    """``getprop``'s ``[key]: [value]`` lines.  A value that spans lines (rare, but
    getprop prints embedded newlines raw) is joined with ``\\n``; anything else is skipped."""
    props: dict[str, str] = {}
    pending: tuple[str, list[str]] | None = None
    for line in _lines(text):
        if pending is not None:
            key, parts = pending
            if line.endswith("]"):
                parts.append(line[:-1])
                props[key] = "\n".join(parts)
                pending = None
            elif len(parts) < 20:
                parts.append(line)
            else:
                pending = None          # runaway value: drop it
            continue
        m = _PROP.fullmatch(line)
        if m:
            props[m.group(1)] = m.group(2)
            continue
        m = re.fullmatch(r"\[([A-Za-z0-9_.\-:@]{1,256})\]: \[(.*)", line)
        if m:
            pending = (m.group(1), [m.group(2)])
    return props


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo``: kB values by field name."""
    out: dict[str, int] = {}
    for line in _lines(text):
        m = re.fullmatch(r"([A-Za-z0-9_()]{1,40}):\s+(\d{1,18})(?: kB)?\s*", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``0 1 2 3`` (related_cpus) or ``0-3,6`` (cpulist format)."""
    cpus: set[int] = set()
    for part in re.split(r"[\s,]+", text.strip()):
        m = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", part)
        if not m:
            continue
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi >= lo and hi - lo < 1024:
            cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def parse_cpufreq_policies(text: str) -> list[Cluster]:
    """Lines ``policyN|<related_cpus>|<cpuinfo_max_freq>`` made by :func:`facts_script`."""
    clusters = []
    for line in _lines(text):
        parts = line.split("|")
        if len(parts) != 3 or not re.fullmatch(r"policy\d{1,4}", parts[0].strip()):
            continue
        cpus = parse_cpulist(parts[1])
        if cpus:
            clusters.append(Cluster(cpus, _positive(parts[2])))
    return sorted(clusters, key=lambda c: c.cpus)


def _positive(text: str) -> int | None:
    value = _int(text)
    return value if value is not None and value > 0 else None


def parse_cpu_freqs(text: str) -> list[Cluster]:
    """Lines ``cpuN|<cpuinfo_max_freq>`` (per-CPU files, when there are no policies):
    CPUs with the same max frequency form one cluster."""
    by_freq: dict[int | None, list[int]] = {}
    for line in _lines(text):
        parts = line.split("|")
        if len(parts) != 2:
            continue
        m = re.fullmatch(r"cpu(\d{1,4})", parts[0].strip())
        if m:
            by_freq.setdefault(_positive(parts[1]), []).append(int(m.group(1)))
    if set(by_freq) == {None}:
        return []
    return sorted((Cluster(tuple(sorted(cpus)), khz) for khz, cpus in by_freq.items()), key=lambda c: c.cpus)


def parse_cpuinfo(text: str) -> dict:
    """``/proc/cpuinfo``: the number of processors, the hardware name, and
    the ARM core parts (``CPU part``) per processor."""
    processors: list[int] = []
    parts: dict[int, str] = {}
    hardware = model = None
    current: int | None = None
    for line in _lines(text):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            current = int(value)
            processors.append(current)
        elif key == "cpu part" and current is not None:
            parts[current] = value.lower()
        elif key == "hardware":
            hardware = _clip(value)
        elif key in ("model name", "model") and model is None and not value.isdigit():
            model = _clip(value)
    return {"processors": sorted(set(processors)), "parts": parts, "hardware": hardware, "model": model}


def clusters_from_cpuinfo(info: dict) -> list[Cluster]:
    """CPUs grouped by core part when frequencies are unknown (max_khz None)."""
    groups: dict[str, list[int]] = {}
    for cpu, part in info["parts"].items():
        groups.setdefault(part, []).append(cpu)
    if len(groups) < 1:
        return []
    return sorted((Cluster(tuple(sorted(cpus)), None) for cpus in groups.values()), key=lambda c: c.cpus)


def parse_df(text: str) -> int | None:
    """Available KiB from ``df -k DIR`` (toybox, busybox or coreutils; a long device
    name may push the numbers onto the next line)."""
    tokens: list[str] = []
    for line in _lines(text):
        if not line.strip() or line.lstrip().lower().startswith("filesystem"):
            continue
        tokens += line.split()
    for i in range(len(tokens) - 3):
        size, used, avail, pct = tokens[i:i + 4]
        if size.isdigit() and used.isdigit() and avail.isdigit() and re.fullmatch(r"\d{1,3}%|-", pct):
            return int(avail)
    return None


_TEMPERATURE = re.compile(r"Temperature\{mValue=(-?\d{1,4}(?:\.\d{1,6})?|NaN), mType=(-?\d{1,3}), "
                          r"mName=([^,{}]{1,80}), mStatus=(-?\d{1,3})\}")


def parse_thermalservice(text: str) -> tuple[int | None, list[Temperature]]:
    """``dumpsys thermalservice``: the thermal status (0-6) and the HAL's current
    temperatures (the cached ones when the HAL section is missing)."""
    status = None
    sections: dict[str, list[Temperature]] = {}
    section = ""
    for line in _lines(text):
        m = re.fullmatch(r"\s*Thermal Status:\s*(\d{1,2})\s*", line)
        if m:
            status = int(m.group(1))
            continue
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            section = line.strip().lower()
            continue
        m = _TEMPERATURE.search(line)
        if m and m.group(1) != "NaN":
            sections.setdefault(section, []).append(Temperature(_clip(m.group(3)) or "?", float(m.group(1))))
    temps = next((v for k, v in sections.items() if "current temperatures" in k), None)
    if temps is None:
        temps = next((v for k, v in sections.items() if "cached temperatures" in k), [])
    seen: dict[str, Temperature] = {}
    for t in temps:
        seen.setdefault(t.name, t)
    return status, list(seen.values())


def parse_battery(text: str) -> dict:
    """``dumpsys battery``: level (%), temperature (tenths of a degree C in the
    dump), voltage (mV) and which sources power it."""
    values: dict[str, str] = {}
    for line in _lines(text):
        key, sep, value = line.partition(":")
        if sep and line.startswith("  ") and not line.startswith("   "):
            values[key.strip().lower()] = value.strip()
    level, scale = _int(values.get("level")), _int(values.get("scale"))
    if level is not None and scale and scale != 100:
        level = round(level * 100 / scale)
    tenths = _int(values.get("temperature"))
    powered = [k.split()[0].lower() for k, v in values.items()
               if k.endswith(" powered") and v.lower() == "true"]
    return {"level": level if level is not None and 0 <= level <= 100 else None,
            "celsius": tenths / 10 if tenths is not None and -400 < tenths < 1500 else None,
            "mv": _int(values.get("voltage")),
            "powered": powered}


def parse_thermal_zones(text: str) -> list[Temperature]:
    """Lines ``thermal_zoneN|<type>|<temp>`` (millidegrees; empty when unreadable)."""
    temps = []
    for line in _lines(text):
        parts = line.split("|")
        if len(parts) != 3 or not re.fullmatch(r"thermal_zone\d{1,4}", parts[0].strip()):
            continue
        milli = _int(parts[2])
        if milli is None or not -40_000 < milli < 150_000:
            continue        # unreadable, or a sensor reporting nonsense
        temps.append(Temperature(_clip(parts[1]) or parts[0].strip(), milli / 1000))
    return temps


def big_core_count(clusters: list[Cluster]) -> int | None:
    """The big cores: every CPU outside the slowest cpufreq cluster (on a 1+3+4 phone, 4;
    on 1+4+4, 5), so the little cores, which would make every thread wait for the slowest,
    are left out.  None when fewer than two distinct max frequencies are known."""
    known = [c for c in clusters if c.max_khz]
    if len({c.max_khz for c in known}) < 2:
        return None
    slowest = min(c.max_khz for c in known)
    return len({cpu for c in known if c.max_khz > slowest for cpu in c.cpus}) or None


# the big cores of a device in one shell round-trip (the default thread count of a measured command)


def parse_cpu_topology(text: str) -> int:
    """Big cores from ``policy <cpus> : <max kHz>`` and ``online <ranges>`` lines (``cpu_topology_command``).

    Big = every online CPU outside the slowest cpufreq cluster (the rule of
    ``big_core_count``); with one cluster (or no cpufreq), every
    online CPU.  On a 1+3+4 phone that is 4.
    """
    text = bounded(text, MAX_TEXT_CHARS, "the CPU topology")
    policies: list[tuple[set[int], int]] = []
    online: set[int] = set()
    for line in text.replace("\r\n", "\n").splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "policy" and ":" in words:
            colon = words.index(":")
            cpus = {int(w) for w in words[1:colon] if w.isdigit() and len(w) < 5}
            freq = words[colon + 1] if colon + 1 < len(words) else ""
            if cpus and freq.isdigit() and len(freq) < 12:
                policies.append((cpus, int(freq)))
        elif len(words) == 2 and words[0] == "online":
            online = set(parse_cpulist(words[1]))
    clusters = [Cluster(tuple(sorted(cpus & online if online else cpus)), freq) for cpus, freq in policies]
    big = big_core_count([c for c in clusters if c.cpus])
    if big:
        return big
    if online:
        return len(online)
    if policies:
        return len(set().union(*(cpus for cpus, _freq in policies)))
    raise DeviceOutputError(f"cannot tell the device's CPUs from {text[:200]!r}")


CPU_TOPOLOGY_COMMAND = (
    "cd /sys/devices/system/cpu 2>/dev/null || exit 0; "
    "for p in cpufreq/policy*; do [ -r \"$p/related_cpus\" ] && "
    "echo \"policy $(cat \"$p/related_cpus\") : $(cat \"$p/cpuinfo_max_freq\" 2>/dev/null)\"; done; "
    "echo \"online $(cat online 2>/dev/null)\""
)


def big_cores(transport: Transport, timeout: float = 30.0) -> int:
    """The number of big cores: the default thread count on a device."""
    result = transport.shell(CPU_TOPOLOGY_COMMAND, timeout)
    return parse_cpu_topology(result.stdout)


def recommended_threads(facts: DeviceFacts) -> int:
    """The default thread count on a device: its big cores (:func:`big_core_count`).

    With one cluster or no frequencies, all known CPUs (a homogeneous or unknown
    layout); without anything, 4 (the big-core count of most phones)."""
    big = big_core_count(facts.clusters)
    if big:
        return big
    if facts.cpu_count:
        return facts.cpu_count
    cpus = {cpu for c in facts.clusters for cpu in c.cpus}
    return len(cpus) or 4


# ---------------------------------------------------------------------------
# the script and its sections


SECTIONS = ("getprop", "meminfo", "cpufreq", "cpus", "cpuinfo", "df", "writable", "thermalservice", "battery",
            "zones", "uname", "end")


def _section_commands(workdir: str) -> dict[str, str]:
    return {
        "getprop": "getprop 2>/dev/null",
        "meminfo": "cat /proc/meminfo 2>/dev/null",
        "cpufreq": "for p in /sys/devices/system/cpu/cpufreq/policy*; do [ -d \"$p\" ] && "
                   "echo \"${p##*/}|$(cat \"$p/related_cpus\" 2>/dev/null)|$(cat \"$p/cpuinfo_max_freq\" 2>/dev/null)\"; "
                   "done",
        "cpus": "for c in /sys/devices/system/cpu/cpu[0-9]*; do [ -d \"$c\" ] && "
                "echo \"${c##*/}|$(cat \"$c/cpufreq/cpuinfo_max_freq\" 2>/dev/null)\"; done",
        "cpuinfo": "cat /proc/cpuinfo 2>/dev/null",
        "df": f"d={quote(workdir)}; while [ ! -d \"$d\" ] && [ \"$d\" != / ]; do d=$(dirname \"$d\"); done; "
              "df -k \"$d\" 2>/dev/null",
        # the nearest existing entry must be a folder we may write in (a file in the way stops mkdir -p)
        "writable": f"d={quote(workdir)}; while [ ! -e \"$d\" ] && [ \"$d\" != / ]; do d=$(dirname \"$d\"); done; "
                    "if [ -d \"$d\" ] && [ -w \"$d\" ] && [ -x \"$d\" ]; then echo yes; else echo no; fi",
        "thermalservice": "dumpsys thermalservice 2>/dev/null",
        "battery": "dumpsys battery 2>/dev/null",
        "zones": "for z in /sys/class/thermal/thermal_zone*; do [ -d \"$z\" ] && "
                 "echo \"${z##*/}|$(cat \"$z/type\" 2>/dev/null)|$(cat \"$z/temp\" 2>/dev/null)\"; done",
        "uname": "uname -m 2>/dev/null",
    }


def facts_script(workdir: str, nonce: str, sections: tuple[str, ...] | None = None) -> str:
    """One shell script printing every source (or only ``sections``), each after a
    ``<nonce> <section>`` line.

    ``df`` and ``writable`` look at the nearest existing folder of ``workdir`` so listing creates nothing."""
    commands = _section_commands(workdir)
    wanted = [name for name in SECTIONS if name != "end" and (sections is None or name in sections)]
    return "\n".join([f"echo {nonce} {name}; {commands[name]}" for name in wanted] + [f"echo {nonce} end", "true"])


def new_nonce() -> str:
    return "@@eqfacts-" + secrets.token_hex(6)


def split_sections(output: str, nonce: str) -> dict[str, str]:
    """The text of each section; a section line must be exactly ``<nonce> <name>``."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _lines(output):
        head, _, name = line.strip().partition(" ")
        if head == nonce and name in SECTIONS:
            current = sections.setdefault(name, [])
            continue
        if current is not None:
            current.append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def facts_from_sections(serial: str, transport: str, workdir: str, sections: dict[str, str]) -> DeviceFacts:
    props = parse_getprop(sections.get("getprop", ""))
    mem = parse_meminfo(sections.get("meminfo", ""))
    cpuinfo = parse_cpuinfo(sections.get("cpuinfo", ""))
    clusters = (parse_cpufreq_policies(sections.get("cpufreq", ""))
                or parse_cpu_freqs(sections.get("cpus", ""))
                or clusters_from_cpuinfo(cpuinfo))
    cpu_ids = {int(m.group(1)) for m in re.finditer(r"^cpu(\d{1,4})\|", sections.get("cpus", ""), re.M)}
    cpu_count = len(cpu_ids) or len(cpuinfo["processors"]) or None
    status, temps = parse_thermalservice(sections.get("thermalservice", ""))
    if not temps:
        temps = parse_thermal_zones(sections.get("zones", ""))
    battery = parse_battery(sections.get("battery", ""))
    uname = _clip(sections.get("uname", "").strip().split("\n")[0]) if sections.get("uname") else None
    abis = [a for a in (props.get("ro.product.cpu.abilist") or "").split(",") if a]
    soc = " ".join(v for v in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if v) or None
    soc = soc or props.get("ro.board.platform") or props.get("ro.hardware") or cpuinfo["hardware"] \
        or cpuinfo["model"]
    return DeviceFacts(
        serial=serial, transport=transport,
        model=_clip(props.get("ro.product.model")),
        manufacturer=_clip(props.get("ro.product.manufacturer")),
        soc=_clip(soc),
        abi=_clip(props.get("ro.product.cpu.abi") or uname),
        abis=[_clip(a) for a in abis][:8],
        android_release=_clip(props.get("ro.build.version.release")),
        sdk=_int(props.get("ro.build.version.sdk")),
        ram_total_kib=mem.get("MemTotal"),
        ram_available_kib=mem.get("MemAvailable", mem.get("MemFree")),
        clusters=clusters,
        cpu_count=cpu_count,
        workdir=workdir,
        workdir_free_kib=parse_df(sections.get("df", "")),
        workdir_writable={"yes": True, "no": False}.get(sections.get("writable", "").strip()),
        thermal_status=status,
        temperatures=temps,
        battery_level=battery["level"],
        battery_celsius=battery["celsius"],
        battery_mv=battery["mv"],
        battery_powered=battery["powered"],
    )


def collect_facts(transport: Transport, workdir: str, timeout: float = 60,
                  sections: tuple[str, ...] | None = None) -> DeviceFacts:
    """Every fact of one device (or those of ``sections``) in a single shell round-trip."""
    nonce = new_nonce()
    result = transport.shell(facts_script(workdir, nonce, sections), timeout=timeout)
    return facts_from_sections(transport.serial, transport.kind, workdir, split_sections(result.stdout, nonce))


HEALTH_SECTIONS = ("meminfo", "thermalservice", "battery", "zones")
