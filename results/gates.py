"""Regression gates for ``edgequant compare``: a TOML profile, validated at load time.

The built-in profile is ``profiles/gates.toml`` (``--gates gates``); any TOML
file of the same shape works with ``--gates PATH``.  Every error names the
file, the field and what is allowed.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgequant.core.errors import BadInput

MAX_BYTES = 1 << 16
SECTIONS = {
    "gates": ("name", "description"),
    "speed": ("metrics", "max_drop_pct", "noise_factor", "alpha"),
    "memory": ("metrics", "max_rise_pct", "max_rise_mib"),
    "quality": ("alpha", "margin", "suite_gates"),
    "coverage": ("missing",),
}


@dataclass(frozen=True)
class Gates:
    name: str = "default"
    path: str = ""
    speed_metrics: tuple[str, ...] = ("pp_tps", "tg_tps")
    max_drop_pct: float = 10.0
    noise_factor: float = 1.0
    speed_alpha: float = 0.05
    memory_metrics: tuple[str, ...] = ("peak_rss", "peak_rss_anon")
    max_rise_pct: float = 10.0
    max_rise_mib: float = 200.0
    alpha: float = 0.05
    margin: float = 0.05      # non-inferiority margin of the per-case quality gates (0.05 = 5 points)
    suite_gates: bool = True
    missing: bool = True


def _fail(path: str, field: str, message: str) -> BadInput:
    return BadInput(f"gates profile {path}: {field} {message}")


def _number(path: str, field: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _fail(path, field, f"must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _margin(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise _fail(path, "quality.margin", f"must be a number between 0 and 1 (exclusive; 0.05 = 5 points), "
                                            f"got {value!r}")
    return float(value)


def _flag(path: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, field, f"must be true or false, got {value!r}")
    return value


def _metrics(path: str, field: str, value: Any) -> tuple[str, ...]:
    if (not isinstance(value, list) or len(value) > 32
            or not all(isinstance(v, str) and v.replace("_", "").isalnum() and len(v) <= 64 for v in value)):
        raise _fail(path, field, f"must be a list of metric names (e.g. [\"pp_tps\", \"tg_tps\"]), got {value!r}")
    return tuple(value)


def parse_gates(data: dict[str, Any], path: str) -> Gates:
    for section, value in data.items():
        if section not in SECTIONS:
            raise _fail(path, f"[{section}]", f"is not a gates section; allowed: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise _fail(path, f"[{section}]", "must be a table")
        for key in value:
            if key not in SECTIONS[section]:
                raise _fail(path, f"{section}.{key}", f"is not a field; allowed: {', '.join(SECTIONS[section])}")
    if "gates" not in data:
        raise _fail(path, "[gates]", "is missing (a gates profile starts with a [gates] table)")
    d = Gates()
    g, sp, mem, q, cov = (data.get(s, {}) for s in ("gates", "speed", "memory", "quality", "coverage"))
    name = g.get("name", path)
    if not isinstance(name, str) or not name:
        raise _fail(path, "gates.name", f"must be a non-empty string, got {name!r}")
    return Gates(
        name=name, path=path,
        speed_metrics=_metrics(path, "speed.metrics", sp.get("metrics", list(d.speed_metrics))),
        max_drop_pct=_number(path, "speed.max_drop_pct", sp.get("max_drop_pct", d.max_drop_pct), 0, 100),
        noise_factor=_number(path, "speed.noise_factor", sp.get("noise_factor", d.noise_factor), 0, 100),
        speed_alpha=_number(path, "speed.alpha", sp.get("alpha", d.speed_alpha), 1e-9, 0.5),
        memory_metrics=_metrics(path, "memory.metrics", mem.get("metrics", list(d.memory_metrics))),
        max_rise_pct=_number(path, "memory.max_rise_pct", mem.get("max_rise_pct", d.max_rise_pct), 0, 1e6),
        max_rise_mib=_number(path, "memory.max_rise_mib", mem.get("max_rise_mib", d.max_rise_mib), 0, 1e9),
        alpha=_number(path, "quality.alpha", q.get("alpha", d.alpha), 1e-9, 0.5),
        margin=_margin(path, q.get("margin", d.margin)),
        suite_gates=_flag(path, "quality.suite_gates", q.get("suite_gates", d.suite_gates)),
        missing=_flag(path, "coverage.missing", cov.get("missing", d.missing)),
    )


def load_gates(name_or_path: str | Path = "gates") -> Gates:
    """Load the built-in gates profile by name (``gates``) or a TOML file by path."""
    given = Path(name_or_path)
    if given.suffix == ".toml" or given.exists() or "/" in str(name_or_path):
        path = given
        if not path.is_file():
            raise BadInput(f"gates profile {path}: no such file; pass `--gates gates` (built-in) or a .toml path")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BadInput(f"gates profile {path}: cannot be read: {exc}") from None
    else:
        res = resources.files("edgequant.profiles") / f"{name_or_path}.toml"
        if not res.is_file():
            raise BadInput(f"gates profile '{name_or_path}' not found; the built-in one is 'gates', "
                           f"or pass a path to a .toml file")
        path, raw = Path(str(res)), res.read_bytes()
    if len(raw) > MAX_BYTES:
        raise BadInput(f"gates profile {path}: {len(raw)} bytes, over the limit of {MAX_BYTES}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"gates profile {path}: not valid TOML ({exc})") from None
    return parse_gates(data, str(path))
