"""Declarative TOML profiles: which quant types to make and how to benchmark them.

A profile is found by name (a ``.toml`` file shipped in this package) or by
path.  It is validated completely at load time; every error names the file,
the field and the allowed values.  Loading never changes process state.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from edgequant.core.errors import BadInput
from edgequant.profiles.onnx_variants import OnnxSpec, OnnxVariant, parse_onnx  # noqa: F401 - re-exported
from edgequant.profiles.rungs import parse_rung
from edgequant.profiles.suites import MAX_GATES, parse_gate

# Types llama.cpp refuses to make without an importance matrix
# (mirrors the check in llama.cpp's tools/quantize).
# Types llama.cpp's quantizer refuses to make without an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix: IQ1_*, IQ2_XXS/XS/S and IQ3_XXS tensors, Q2_K in a Q2_K_S file; IQ2_M and IQ3_XS
# mix in such tensors: "this quantization requires an imatrix!").
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
# Types gguf and llama-cpp-python name that llama.cpp's quantizer cannot make at all (llama-quant.cpp,
# llama_ftype_get_default_type has no case for them: "invalid output file type").
CANNOT_MAKE = {"NVFP4": "llama.cpp's quantizer has no tensor type for this file type (it only loads such files)"}
# llama.cpp's llama_flash_attn_type, by the names llama-bench's -fa takes.
FLASH_ATTN = ("auto", "on", "off")
REPACK = ("auto", "on", "off")
# Float types that are references, not quantizations.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
# KV cache types llama-bench's -ctk/-ctv accept (its ggml_type_from_name), by ggml's type names;
# the values are gguf.GGMLQuantizationType's (= ggml's enum ggml_type).  Every type but the two
# floats is quantized: llama.cpp needs flash attention for a quantized V cache.
CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
FLOAT_CACHE_TYPES = frozenset({"f16", "bf16"})
# a depth given as this word is the token length of the eval suite's prompt prefix, per format
SUITE_DEPTH = "suite"


@lru_cache(maxsize=1)
def quant_types() -> dict[str, int]:
    """Quant type name -> llama_ftype value, for every type both gguf and llama.cpp know.

    Names and values come from ``gguf.LlamaFileType`` (which mirrors llama.cpp's
    ``llama_ftype``), kept only where the installed llama-cpp-python exposes the
    same constant with the same value, so a listed type can really be made.
    """
    import gguf
    import llama_cpp

    out: dict[str, int] = {}
    for member in gguf.LlamaFileType:
        if member.name == "ALL_F32":
            name = "F32"
        elif member.name.startswith("MOSTLY_"):
            name = member.name.removeprefix("MOSTLY_")
        else:
            continue
        ours = getattr(llama_cpp, f"LLAMA_FTYPE_{member.name}", None)
        if ours is not None and int(ours) == int(member.value):
            out[name] = int(member.value)
    return out


def _valid_list(names) -> str:
    return ", ".join(sorted(names))


@dataclass(frozen=True)
class QuantOptions:
    """Fields of llama.cpp's ``llama_model_quantize_params`` a profile may set."""

    threads: int = 0
    pure: bool = False
    leave_output_tensor: bool = False
    allow_requantize: bool = False

    def as_key(self) -> dict[str, Any]:
        # threads does not change the output bytes, so it is not part of the cache key
        return {"pure": self.pure, "leave_output_tensor": self.leave_output_tensor,
                "allow_requantize": self.allow_requantize}


@dataclass(frozen=True)
class QuantSpec:
    reference: str = "BF16"
    types: tuple[str, ...] = ()
    options: QuantOptions = field(default_factory=QuantOptions)


@dataclass(frozen=True)
class BenchSettings:
    """How each rung is measured; the defaults are llama-bench's tests pp512 and tg128."""

    threads: int = 0
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 3
    warmup: int = 1
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"
    mmap: bool = True
    # llama.cpp's weight repacking (llama-bench --repack, model param use_extra_bufts):
    # "auto" turns it off on x86 CPUs with AMX, whose repacked kernels fault in some VMs
    # (general protection fault seen under Firecracker), and keeps it on elsewhere.
    repack: str = "auto"
    timeout: float = 1800.0
    # llama-bench -d: tokens already in the context before each pp/tg test (an int, or "suite": the
    # eval suite's prompt prefix per format); -ctk/-ctv: the K and V cache type of each variant
    depths: tuple = (0,)
    cache_types: tuple = ("f16",)
    # Other load on the machine while a rung is measured (edgequant.devices.contention), in cores: above
    # contention_threshold the rung is measured again, up to contention_retries times, each after waiting
    # at most contention_wait seconds for the machine to be quiet; still above it, it is stored `noisy`.
    # How a rung is judged, not what is measured: not in as_params().  $EDGEQUANT_CONTENTION_THRESHOLD
    # changes the default (e.g. a CI box that shares its CPU on purpose); a profile's own value wins.
    contention_threshold: float = field(default_factory=lambda: default_contention_threshold())
    contention_retries: int = 2
    contention_wait: float = 60.0

    def resolved_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        import psutil

        return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1

    def resolved_repack(self) -> bool:
        if self.repack != "auto":
            return self.repack == "on"
        return not cpu_has_amx()

    @property
    def has_variants(self) -> bool:
        """Whether a rung is measured in more than llama-bench's default setting (depth 0, f16 cache)."""
        return tuple(self.depths) != (0,) or tuple(self.cache_types) != ("f16",)

    def as_params(self) -> dict[str, Any]:
        """The parameters that define a measurement (stored with every row)."""
        return {"threads": self.resolved_threads(), "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "repetitions": self.repetitions, "warmup": self.warmup, "n_batch": self.n_batch,
                "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn, "mmap": self.mmap,
                "repack": self.resolved_repack()}


CONTENTION_ENV = "EDGEQUANT_CONTENTION_THRESHOLD"


def default_contention_threshold() -> float:
    """0.10 of one core, or $EDGEQUANT_CONTENTION_THRESHOLD (cores)."""
    text = os.environ.get(CONTENTION_ENV, "").strip()
    if not text:
        return 0.10
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or not 0.0 <= value <= 1024.0:
        raise BadInput(f"{CONTENTION_ENV}={text!r}: must be a number of cores from 0 to 1024 (other load above "
                       f"which a rung is re-measured, then stored noisy); unset it for the default 0.10")
    return value


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class CoolDown:
    """When a phone is cool enough to start a rung (see edgequant.devices.health)."""
    max_status: int = 0            # 0 = "none": no throttling requested by the thermal service
    max_celsius: float = 40.0      # battery temperature (else the hottest sensor)
    max_wait_s: float = 300.0
    poll_s: float = 10.0

    def __post_init__(self):
        if not 0 <= self.max_status <= 6:
            raise BadInput(f"cool-down thermal status {self.max_status} is not an Android thermal status (0-6)")
        if not -20 < self.max_celsius < 120:
            raise BadInput(f"cool-down temperature {self.max_celsius} °C is out of range (-20..120)")
        if self.max_wait_s < 0 or self.poll_s <= 0:
            raise BadInput("cool-down wait and poll interval must be positive")


@dataclass(frozen=True)
class DeviceSettings:
    """``[device]``: how runs on phones wait for a cool phone (see edgequant.devices.health)."""

    cooldown_status: int = 0          # highest Android thermal status to start a rung at (0 none .. 6)
    cooldown_celsius: float = 40.0    # highest battery (else hottest sensor) temperature to start at
    cooldown_max_wait: float = 300.0  # seconds to wait for it before starting anyway (marked throttled)
    cooldown_poll: float = 10.0       # seconds between readings while waiting
    # energy per token: the battery's current_now and voltage_now sampled during each llama-bench run
    energy: bool = False
    power_supply: str = "/sys/class/power_supply/battery"

    def cooldown(self) -> CoolDown:
        return CoolDown(self.cooldown_status, self.cooldown_celsius, self.cooldown_max_wait, self.cooldown_poll)


_DEVICE_BOUNDS = {"cooldown_status": (0, 6), "cooldown_celsius": (-20.0, 120.0),
                  "cooldown_max_wait": (0.0, 24 * 3600.0), "cooldown_poll": (0.1, 3600.0)}


@dataclass(frozen=True)
class SustainedSettings:
    """``[sustained]``: ``runs`` back-to-back generation runs of one rung with no cool-down in between,
    each ``n_gen`` tokens (0 = bench.n_gen), with the thermal state read after each run."""

    runs: int = 8
    rung: str = ""        # a quant type of the profile; "" = the first one (the reference when there is none)
    n_gen: int = 0

    def target(self, profile: "Profile") -> str:
        return self.rung or (profile.quant.types[0] if profile.quant.types else profile.quant.reference)


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    quant: QuantSpec
    bench: BenchSettings
    device: DeviceSettings = DeviceSettings()
    onnx: OnnxSpec = OnnxSpec()          # [onnx]: ONNX variants (none by default)
    sustained: SustainedSettings | None = None   # [sustained]: back-to-back runs of one rung (off by default)
    quality_gates: tuple = ()            # [quality] gates: suite-style gates added to the eval suite's

    def rungs(self) -> list[str]:
        """The reference first, then the quant types in profile order."""
        return [self.quant.reference] + [t for t in self.quant.types if t != self.quant.reference]

    @property
    def needs_imatrix(self) -> bool:
        """Whether a rung asks for an importance matrix (``+imatrix``)."""
        return any(parse_rung(t).imatrix for t in self.quant.types)


# ---------------------------------------------------------------------------
# validation


class _Checker:
    def __init__(self, path: Path, label: str | None = None):
        self.path = path
        self.label = label or f"profile {path}"

    def fail(self, where: str, message: str) -> BadInput:
        return BadInput(f"{self.label}: field '{where}' {message}")

    def table(self, data: dict, where: str, allowed: set[str]) -> dict:
        if not isinstance(data, dict):
            raise self.fail(where, "must be a table")
        unknown = sorted(set(data) - allowed)
        if unknown:
            name = f"{where}.{unknown[0]}" if where else unknown[0]
            raise self.fail(name, f"is not a known field; allowed: {_valid_list(allowed)}")
        return data

    def typed(self, value, where: str, kind, minimum=None, maximum=None):
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(where, f"must be {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(where, f"must be <= {maximum}, got {value!r}")
        return value

    def quant_type(self, value, where: str, reference: bool = False) -> str:
        """A type name, upper-cased; for a quant rung the canonical rung name (edgequant.profiles.rungs)."""
        known = quant_types()
        if not reference and isinstance(value, str) and "+" in value:
            spec = parse_rung(value, f"{self.label}: field '{where}'")
            if spec.base not in known:
                raise self.fail(where, f"has unknown quant type {spec.base!r} in {value!r}; valid types: "
                                       f"{_valid_list(known)}")
            if spec.base in FLOAT_TYPES:
                raise self.fail(where, f"{value!r}: modifiers apply to quant types, not to {spec.base}")
            if spec.base in CANNOT_MAKE:
                raise self.fail(where, f"{value!r}: {spec.base} cannot be made here: {CANNOT_MAKE[spec.base]}")
            if spec.base in NEEDS_IMATRIX and not spec.imatrix:
                raise self.fail(where, f"{spec.base} needs an importance matrix; add '+imatrix' to {value!r}")
            return spec.name
        if not isinstance(value, str) or value.upper() not in known:
            raise self.fail(where, f"has unknown quant type {value!r}; valid types: {_valid_list(known)}")
        name = value.upper()
        if reference and name not in FLOAT_TYPES:
            raise self.fail(where, f"must be a float type, got {value!r}; allowed: {_valid_list(FLOAT_TYPES)}")
        if not reference and name in CANNOT_MAKE:
            raise self.fail(where, f"{name} cannot be made here: {CANNOT_MAKE[name]}; pick another type")
        if not reference and name in NEEDS_IMATRIX:
            raise self.fail(where, f"{name} needs an importance matrix; write it as '{name}+imatrix' "
                                   f"(computed from the eval suite's calibration cases)")
        return name


def _dataclass_from(checker: _Checker, cls, data: dict, where: str, bounds: dict):
    names = {f.name for f in fields(cls)}
    checker.table(data, where, names)
    values = {}
    defaults = cls()
    for f in fields(cls):
        if f.name not in data:
            continue
        kind = type(getattr(defaults, f.name))
        lo, hi = bounds.get(f.name, (None, None))
        values[f.name] = checker.typed(data[f.name], f"{where}.{f.name}", kind, lo, hi)
    return cls(**values)


def _parse_depths(c: _Checker, value) -> tuple:
    where = "bench.depths"
    if not isinstance(value, list) or not value:
        raise c.fail(where, f"must be a non-empty list of token counts >= 0 or \"{SUITE_DEPTH}\", got {value!r}")
    out: list = []
    for i, d in enumerate(value):
        if d == SUITE_DEPTH:
            pass
        elif isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 1 << 20:
            raise c.fail(f"{where}[{i}]", f"must be a token count from 0 to {1 << 20} or \"{SUITE_DEPTH}\" "
                                          f"(the eval suite's prompt prefix), got {d!r}")
        if d in out:
            raise c.fail(f"{where}[{i}]", f"repeats {d!r}")
        out.append(d)
    return tuple(out)


def _parse_cache_types(c: _Checker, value, flash_attn: str) -> tuple:
    where = "bench.cache_types"
    if not isinstance(value, list) or not value:
        raise c.fail(where, f"must be a non-empty list of KV cache types ({', '.join(CACHE_TYPES)}), got {value!r}")
    out: list[str] = []
    for i, t in enumerate(value):
        name = t.lower() if isinstance(t, str) else t
        if name not in CACHE_TYPES:
            raise c.fail(f"{where}[{i}]", f"has unknown KV cache type {t!r}; allowed (llama.cpp -ctk/-ctv): "
                                          f"{', '.join(CACHE_TYPES)}")
        if name in out:
            raise c.fail(f"{where}[{i}]", f"repeats {name}")
        if name not in FLOAT_CACHE_TYPES and flash_attn == "off":
            raise c.fail(f"{where}[{i}]", f"{name} is a quantized V cache, which llama.cpp runs only with flash "
                                          f"attention: set bench.flash_attn to \"auto\" or \"on\", or use only "
                                          f"{' or '.join(sorted(FLOAT_CACHE_TYPES))}")
        out.append(name)
    return tuple(out)


_BENCH_BOUNDS = {
    "threads": (0, 1024), "n_prompt": (1, 1 << 20), "n_gen": (1, 1 << 20),
    "repetitions": (3, 1000), "warmup": (0, 100), "n_batch": (1, 1 << 20),
    "n_ubatch": (1, 1 << 20), "timeout": (1.0, 7 * 24 * 3600.0),
    "contention_threshold": (0.0, 1024.0), "contention_retries": (0, 100), "contention_wait": (0.0, 24 * 3600.0),
}


def parse_profile(data: dict, path: Path) -> Profile:
    c = _Checker(path)
    c.table(data, "", {"profile", "quantize", "bench", "device", "onnx", "sustained", "quality"})
    meta = c.table(data.get("profile", {}), "profile", {"name", "description"})
    name = meta.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise c.fail("profile.name", "must be a non-empty string")
    description = meta.get("description", "")
    if not isinstance(description, str):
        raise c.fail("profile.description", "must be a string")

    q = c.table(data.get("quantize", {}), "quantize", {"reference", "types", "options"})
    reference = c.quant_type(q.get("reference", "BF16"), "quantize.reference", reference=True)
    types = q.get("types", [])
    if not isinstance(types, list):
        raise c.fail("quantize.types", "must be a list of quant type names")
    checked: list[str] = []
    for i, t in enumerate(types):
        name_ = c.quant_type(t, f"quantize.types[{i}]")
        if name_ in checked:
            raise c.fail(f"quantize.types[{i}]", f"repeats {name_}")
        checked.append(name_)
    options = _dataclass_from(c, QuantOptions, q.get("options", {}), "quantize.options", {"threads": (0, 1024)})

    bench_data = data.get("bench", {})
    lists = {}
    if isinstance(bench_data, dict):
        lists = {k: bench_data[k] for k in ("depths", "cache_types") if k in bench_data}
        bench_data = {k: v for k, v in bench_data.items() if k not in lists}
    bench = _dataclass_from(c, BenchSettings, bench_data, "bench", _BENCH_BOUNDS)
    if "depths" in lists:
        bench = replace(bench, depths=_parse_depths(c, lists["depths"]))
    if "cache_types" in lists:
        bench = replace(bench, cache_types=_parse_cache_types(c, lists["cache_types"], bench.flash_attn))
    if bench.flash_attn not in FLASH_ATTN:
        raise c.fail("bench.flash_attn", f"must be one of {', '.join(FLASH_ATTN)}, got {bench.flash_attn!r}")
    if bench.repack not in REPACK:
        raise c.fail("bench.repack", f"must be one of {', '.join(REPACK)}, got {bench.repack!r}")
    if bench.n_ubatch > bench.n_batch:
        raise c.fail("bench.n_ubatch", f"must be <= bench.n_batch ({bench.n_batch})")
    device = _dataclass_from(c, DeviceSettings, data.get("device", {}), "device", _DEVICE_BOUNDS)
    sustained = None
    if "sustained" in data:
        sustained = _dataclass_from(c, SustainedSettings, data["sustained"], "sustained",
                                    {"runs": (1, 10_000), "n_gen": (0, 1 << 20)})
        rungs = [reference] + checked
        if sustained.rung and sustained.rung not in rungs:
            raise c.fail("sustained.rung", f"must be one of the profile's rungs ({', '.join(rungs)}), "
                                           f"got {sustained.rung!r}")
    return Profile(name=name, path=path, description=description,
                   quant=QuantSpec(reference=reference, types=tuple(checked), options=options),
                   bench=bench, device=device, onnx=parse_onnx(c, data.get("onnx")), sustained=sustained,
                   quality_gates=_quality_gates(c, data.get("quality", {})))


def _quality_gates(c: _Checker, data: Any) -> tuple:
    """``[quality] gates``: absolute or relative gates, as in a suite file (``edgequant.profiles.suites``)."""
    c.table(data, "quality", {"gates"})
    raw = data.get("gates", [])
    if not isinstance(raw, list) or len(raw) > MAX_GATES:
        raise c.fail("quality.gates", f"must be a list of at most {MAX_GATES} gates like "
                                      f"'xml_parse_rate >= ref - 0.05'")
    return tuple(parse_gate(g, c.label, f"quality.gates[{i}]") for i, g in enumerate(raw))


def builtin_profiles() -> list[str]:
    """Names of the shipped quant profiles (TOML files here that are not eval suites, gates profiles or pools)."""
    names = []
    for p in resources.files(__package__).iterdir():
        if p.name.endswith(".toml"):
            data = tomllib.loads(p.read_text(encoding="utf-8"))
            if not data.get("suite") and not data.get("gates") and not data.get("pool"):
                names.append(p.name[:-5])
    return sorted(names)


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by built-in name (``default``, ``quick``) or by file path."""
    text_path = Path(name_or_path)
    if text_path.suffix == ".toml" or text_path.exists() or "/" in str(name_or_path):
        path = text_path
    else:
        path = Path(str(resources.files(__package__) / f"{name_or_path}.toml"))
        if not path.exists() or name_or_path not in builtin_profiles():
            raise BadInput(f"profile '{name_or_path}' not found; built-in profiles: "
                           f"{', '.join(builtin_profiles())}, or pass a path to a .toml file")
    if not path.is_file():
        raise BadInput(f"profile {path}: no such file; pass a built-in name "
                       f"({', '.join(builtin_profiles())}) or a path to a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"profile {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"profile {path}: cannot be read: {exc}") from None
    return parse_profile(data, path)


def with_bench_overrides(profile: Profile, **overrides: Any) -> Profile:
    """Apply command-line overrides (None = keep) to a profile's bench settings, validated."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return profile
    c = _Checker(profile.path, label=f"command-line override of profile {profile.name}")
    for key, value in given.items():
        lo, hi = _BENCH_BOUNDS.get(key, (None, None))
        kind = type(getattr(BenchSettings(), key))
        c.typed(value, f"bench.{key}", kind, lo, hi)
    return replace(profile, bench=replace(profile.bench, **given))
