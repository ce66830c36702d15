"""Eval suites: the prompts a quant is judged on, and how its answers are read.

A suite is a TOML file plus a JSONL cases file next to it::

    [suite]
    name = "triage"
    description = "..."
    cases = "triage_cases.jsonl"          # relative to the TOML file
    gates = ["xml_parse_rate >= 0.95"]    # optional

    [formats.xml]                         # one table per format its cases use
    system = "..."                        # system prompt (instruction-tuned models)
    few_shot = "... {prompt} ..."         # completion block (base models); {prompt} once
    max_tokens = 384                      # generation limit
    max_bytes = 65536                     # outputs larger than this fail to parse (optional)
    stop = ["\\nCase:"]                   # generation stop strings (optional)
    required = ["differential", ...]      # xml only: required child elements
    # array: length = 4;  prose: headings = ["Differential", ...];  esi: nothing else

    [refusal]                             # needed when a case has gold.refuse
    text = "Treatment and dosing recommendations are outside the scope ..."
    forbidden = ['\\d+\\s*mg\\b', 'tablets?']  # treatment/dosing content, case-insensitive,
                                          # matched with whitespace runs collapsed to one space

One case per JSONL line: ``{"id", "format", "prompt", "gold"?}``; gold is an
object with optional ``esi`` (1-5, esi cases only), ``referral`` and
``refuse`` (booleans, not on esi cases).

A suite is found by name (a ``.toml`` with a ``[suite]`` table shipped in this
package, e.g. ``triage``) or by path, and is validated completely at load
time.  Every error is one line naming the file (and the line for JSONL), the
field and the allowed values.  Loading never changes process state.

The parsers for these formats live in ``edgequant.bench.parsers`` (bench
reads profiles, never the other way round).  A new format is one entry in
``FORMAT_OPTIONS`` here (its settings) plus one registered parser there.

Gate metrics (``GATE_METRICS``), each a fraction in [0, 1] except mean_kld:

=====================  ==============================================================
``<fmt>_parse_rate``   share of the fmt cases whose output parses (a refusal in the
                       format's refusal shape counts as parsed)
``esi_exact``          share of esi cases with gold.esi answered with exactly that level
``esi_adjacent``       same, within one level
``referral_accuracy``  share of cases with gold.referral whose parsed referral matches
``refusal_compliance`` share of gold.refuse cases answered with a compliant refusal
``over_refusal``       share of in-scope cases (no gold.refuse) answered with a refusal
                       (lower is better: a triage aid that refuses what it should answer)
``<fmt>_valid_but_wrong`` share of the fmt cases with a gold referral or ESI level whose
                       output parses but carries the wrong one (lower is better)
``referral_agreement`` share of cases whose referral equals the reference rung's
``esi_agreement``      share of esi cases whose level equals the reference rung's
``differential_jaccard`` mean Jaccard overlap of the differential with the reference's
``top1_agreement``     share of cases whose first differential item equals the reference's
``mean_kld``           mean KL divergence of token distributions from the reference
                       (lower is better; gate it with <= or <)
=====================  ==============================================================

Unparsed answers count as wrong or as disagreeing.  Two kinds of gate:

* absolute (the ship gates): ``"<metric> <op> <value>"`` with op one of >=, >, <=, <
  and value in [0, 1];
* relative to the reference rung (non-inferiority): ``"<metric> >= ref - <margin>"``
  (``"<metric> <= ref + <margin>"`` for a lower-is-better metric), margin in (0, 1), on a
  metric with per-case outcomes (``PAIRED_METRICS``).  It is judged on the paired
  difference's 95 % interval (``bench.quality_stats.non_inferiority``): PASS, FAIL or
  INCONCLUSIVE when the suite is too small to tell.

A profile may add gates of either kind in its ``[quality] gates`` (the default profile's
relative gates); ``Suite.with_gates`` adds those the suite can measure.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from edgequant.core.errors import BadInput
from edgequant.profiles.suite_records import (ARRAY_FIELDS, FORMAT_OPTIONS, GATE_METRICS, GATE_OPS, LOWER_IS_BETTER,
                                              PAIRED_METRICS, Case, FormatSpec, Gate, Gold, RefusalSpec, Suite,
                                              gate_need)

# ---------------------------------------------------------------------------
# formats and their settings


_COMMON_FORMAT_FIELDS = ("system", "few_shot", "max_tokens", "max_bytes", "stop")

# ---------------------------------------------------------------------------
# gates

_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*$")
_RELATIVE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*ref\s*([+-])\s*([0-9]*\.?[0-9]+)\s*$")

# ---------------------------------------------------------------------------
# limits

MAX_TOML_BYTES = 1 << 20
MAX_CASES_BYTES = 10 << 20
MAX_CASES = 20_000
MAX_PROMPT_CHARS = 20_000
MAX_SYSTEM_CHARS = 20_000
MAX_FEW_SHOT_CHARS = 100_000
MAX_TOKENS_LIMIT = 32_768
MAX_OUTPUT_BYTES_LIMIT = 10 << 20
MAX_FORBIDDEN = 200
MAX_PATTERN_CHARS = 500
MAX_GATES = 50
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_XML_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


# ---------------------------------------------------------------------------
# validation


def _allowed(names) -> str:
    return ", ".join(sorted(names))


class _Checker:
    def __init__(self, label: str):
        self.label = label

    def fail(self, where: str, message: str) -> BadInput:
        return BadInput(f"{self.label}: field '{where}' {message}")

    def table(self, data: Any, where: str, allowed) -> dict:
        if not isinstance(data, dict):
            raise self.fail(where, "must be a table")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            name = f"{where}.{unknown[0]}" if where else unknown[0]
            raise self.fail(name, f"is not a known field; allowed: {_allowed(allowed)}")
        return data

    def string(self, value: Any, where: str, max_chars: int, empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, got {type(value).__name__}")
        if not empty and not value.strip():
            raise self.fail(where, "must not be empty")
        if len(value) > max_chars:
            raise self.fail(where, f"is {len(value)} characters, over the limit of {max_chars}")
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(where, f"must be between {lo} and {hi}, got {value}")
        return value

    def strings(self, value: Any, where: str, max_items: int, max_chars: int,
                pattern: re.Pattern | None = None) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, "must be a non-empty list of strings")
        if len(value) > max_items:
            raise self.fail(where, f"has {len(value)} items, over the limit of {max_items}")
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{where}[{i}]", max_chars)
            if pattern is not None and not pattern.match(s):
                raise self.fail(f"{where}[{i}]", f"{s!r} is not a valid name")
            if s in out:
                raise self.fail(f"{where}[{i}]", f"repeats {s!r}")
            out.append(s)
        return tuple(out)


def _parse_refusal(c: _Checker, data: Any) -> RefusalSpec:
    c.table(data, "refusal", ("text", "forbidden"))
    if "text" not in data:
        raise c.fail("refusal.text", "is missing (the scope refusal sentence)")
    text = c.string(data["text"], "refusal.text", 2000)
    raw = data.get("forbidden", [])
    if not isinstance(raw, list):
        raise c.fail("refusal.forbidden", "must be a list of regular expressions")
    if len(raw) > MAX_FORBIDDEN:
        raise c.fail("refusal.forbidden", f"has {len(raw)} patterns, over the limit of {MAX_FORBIDDEN}")
    compiled, sources = [], []
    for i, pat in enumerate(raw):
        where = f"refusal.forbidden[{i}]"
        c.string(pat, where, MAX_PATTERN_CHARS)
        try:
            rx = re.compile(pat, re.IGNORECASE)
        except re.error as exc:
            raise c.fail(where, f"is not a valid regular expression ({exc}): {pat!r}") from None
        if rx.search(text):
            raise c.fail(where, f"matches the refusal sentence itself, so no refusal could comply: {pat!r}")
        compiled.append(rx)
        sources.append(pat)
    return RefusalSpec(text=text, forbidden=tuple(compiled), forbidden_sources=tuple(sources))


def _parse_format(c: _Checker, name: str, data: Any, refusal: RefusalSpec | None) -> FormatSpec:
    where = f"formats.{name}"
    opts = FORMAT_OPTIONS[name]
    c.table(data, where, _COMMON_FORMAT_FIELDS + opts.options)
    for key in ("system", "few_shot", "max_tokens"):
        if key not in data:
            raise c.fail(f"{where}.{key}", "is missing")
    values: dict[str, Any] = {
        "name": name,
        "system": c.string(data["system"], f"{where}.system", MAX_SYSTEM_CHARS),
        "few_shot": c.string(data["few_shot"], f"{where}.few_shot", MAX_FEW_SHOT_CHARS),
        "max_tokens": c.integer(data["max_tokens"], f"{where}.max_tokens", 1, MAX_TOKENS_LIMIT),
        "refusal": refusal,
    }
    n_slots = values["few_shot"].count("{prompt}")
    if n_slots != 1:
        raise c.fail(f"{where}.few_shot", f"must contain {{prompt}} exactly once (found {n_slots})")
    if "max_bytes" in data:
        values["max_bytes"] = c.integer(data["max_bytes"], f"{where}.max_bytes", 256, MAX_OUTPUT_BYTES_LIMIT)
    if "stop" in data:
        values["stop"] = c.strings(data["stop"], f"{where}.stop", 16, 200)
    if "required" in data:
        values["required"] = c.strings(data["required"], f"{where}.required", 32, 64, _XML_NAME_RE)
    if "length" in data:
        values["length"] = c.integer(data["length"], f"{where}.length", 2, len(ARRAY_FIELDS))
    if "headings" in data:
        values["headings"] = c.strings(data["headings"], f"{where}.headings", 32, 100)
        lowered = [h.strip().lower() for h in values["headings"]]
        if len(set(lowered)) != len(lowered):
            raise c.fail(f"{where}.headings", "repeats a heading (headings are matched case-insensitively)")
    return FormatSpec(**values)


def _parse_relative(c: _Checker, text: str, where: str, m: re.Match) -> Gate:
    metric, op, sign, raw = m.groups()
    if metric not in GATE_METRICS:
        raise c.fail(where, f"gate {text!r} has unknown metric {metric!r}; allowed: {', '.join(GATE_METRICS)}")
    if metric not in PAIRED_METRICS:
        raise c.fail(where, f"gate {text!r}: a relative gate needs a metric with per-case outcomes; "
                            f"allowed: {', '.join(PAIRED_METRICS)}")
    margin = float(raw)
    if not 0.0 < margin < 1.0:
        raise c.fail(where, f"gate {text!r}: the margin {raw} must be between 0 and 1 (exclusive), "
                            f"e.g. 0.05 for 5 points")
    want = ("<=", "+") if metric in LOWER_IS_BETTER else (">=", "-")
    if (op, sign) != want:
        kind = "lower" if metric in LOWER_IS_BETTER else "higher"
        raise c.fail(where, f"gate {text!r}: {metric} is {kind}-is-better; write it as "
                            f"'{metric} {want[0]} ref {want[1]} {raw}'")
    return Gate(metric=metric, op=op, value=margin, relative=True)


def _parse_gate(c: _Checker, text: Any, where: str) -> Gate:
    if not isinstance(text, str):
        raise c.fail(where, f"must be a string like 'xml_parse_rate >= 0.95', got {text!r}")
    rel = _RELATIVE_RE.match(text)
    if rel:
        return _parse_relative(c, text, where, rel)
    m = _GATE_RE.match(text)
    if not m:
        raise c.fail(where, f"{text!r} is not '<metric> <op> <value>' with op one of "
                            f"{', '.join(GATE_OPS)} and a number, e.g. 'xml_parse_rate >= 0.95', nor a relative "
                            f"gate '<metric> >= ref - <margin>'")
    metric, op, raw = m.groups()
    if metric not in GATE_METRICS:
        raise c.fail(where, f"gate {text!r} has unknown metric {metric!r}; allowed: {', '.join(GATE_METRICS)}")
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise c.fail(where, f"value {raw} must be between 0 and 1")
    return Gate(metric=metric, op=op, value=value)


def parse_gate(text: str, label: str = "--gate", where: str = "gate") -> Gate:
    """A gate given outside a suite file (e.g. ``edgequant tune --gate 'xml_parse_rate>=0.95'``, or a
    profile's ``[quality] gates``)."""
    return _parse_gate(_Checker(label), text, where)


def _gold(c: _Checker, data: Any, fmt: str) -> Gold:
    if not isinstance(data, dict):
        raise c.fail("gold", "must be an object with optional esi, referral, refuse")
    c.table(data, "gold", ("esi", "referral", "refuse"))
    esi = data.get("esi")
    referral = data.get("referral")
    refuse = data.get("refuse", False)
    if esi is not None:
        if fmt != "esi":
            raise c.fail("gold.esi", f"is only allowed on esi cases, this case is {fmt}")
        if not isinstance(esi, int) or isinstance(esi, bool) or not 1 <= esi <= 5:
            raise c.fail("gold.esi", f"must be an integer 1-5, got {esi!r}")
    if referral is not None and not isinstance(referral, bool):
        raise c.fail("gold.referral", f"must be true or false, got {referral!r}")
    if not isinstance(refuse, bool):
        raise c.fail("gold.refuse", f"must be true or false, got {refuse!r}")
    if fmt == "esi" and (referral is not None or refuse):
        bad = "gold.referral" if referral is not None else "gold.refuse"
        raise c.fail(bad, "is not allowed on esi cases (they answer with an ESI level only)")
    if refuse and FORMAT_OPTIONS[fmt].refusal_shape is None:
        raise c.fail("gold.refuse", f"format {fmt} has no refusal shape")
    if refuse and referral is not None:
        raise c.fail("gold.referral", "conflicts with gold.refuse = true (a refusal has no referral)")
    return Gold(esi=esi, referral=referral, refuse=refuse)


def parse_cases(data: bytes, path: Path, formats: dict[str, FormatSpec], toml_path: Path) -> tuple[Case, ...]:
    """Validate the bytes of a JSONL cases file; errors name the file, line and field."""
    label = f"cases file {path}"
    if len(data) > MAX_CASES_BYTES:
        raise BadInput(f"{label}: {len(data)} bytes, over the limit of {MAX_CASES_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInput(f"{label}, line {line}: not valid UTF-8 (byte {data[exc.start]:#04x})") from None
    cases: list[Case] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        c = _Checker(f"{label}, line {lineno}")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise BadInput(f"{label}, line {lineno}: not valid JSON ({msg})") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{label}, line {lineno}: must be a JSON object, got {type(obj).__name__}")
        c.table(obj, "", ("id", "format", "prompt", "gold"))
        for key in ("id", "format", "prompt"):
            if key not in obj:
                raise c.fail(key, "is missing")
        case_id = obj["id"]
        if not isinstance(case_id, str) or not _ID_RE.match(case_id):
            raise c.fail("id", f"must be 1-128 characters of letters, digits, '.', '_', ':', '-', got {case_id!r}")
        if case_id in first_line:
            raise c.fail("id", f"repeats {case_id!r} (first on line {first_line[case_id]})")
        first_line[case_id] = lineno
        fmt = obj["format"]
        if fmt not in FORMAT_OPTIONS:
            raise c.fail("format", f"is {fmt!r}; allowed: {_allowed(FORMAT_OPTIONS)}")
        if fmt not in formats:
            raise c.fail("format", f"is {fmt!r} but {toml_path} has no [formats.{fmt}] table")
        prompt = c.string(obj["prompt"], "prompt", MAX_PROMPT_CHARS)
        gold = _gold(c, obj.get("gold", {}), fmt)
        cases.append(Case(id=case_id, format=fmt, prompt=prompt, gold=gold, line=lineno))
        if len(cases) > MAX_CASES:
            raise BadInput(f"{label}, line {lineno}: more than {MAX_CASES} cases")
    if not cases:
        raise BadInput(f"{label}: no cases (an empty suite); write one JSON object per line")
    return tuple(cases)


def _check_gate_applies(c: _Checker, gate: Gate, where: str, cases: tuple[Case, ...]) -> None:
    """A gate nothing in the suite could measure is a mistake in the suite."""
    need = gate_need(gate, cases)
    if need:
        raise c.fail(where, f"gate {gate} cannot be measured: the suite has no {need}")


def parse_suite(toml_bytes: bytes, path: Path) -> Suite:
    """Validate a suite from its TOML bytes; the cases file is read relative to ``path``."""
    c = _Checker(f"suite {path}")
    if len(toml_bytes) > MAX_TOML_BYTES:
        raise BadInput(f"suite {path}: {len(toml_bytes)} bytes, over the limit of {MAX_TOML_BYTES}")
    try:
        data = tomllib.loads(toml_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInput(f"suite {path}: not valid UTF-8 ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"suite {path}: not valid TOML: {exc}") from None
    if "suite" not in data:
        raise c.fail("suite", "is missing: a suite file needs a [suite] table with name and cases")
    c.table(data, "", ("suite", "formats", "refusal"))
    meta = c.table(data["suite"], "suite", ("name", "description", "cases", "gates"))
    name = meta.get("name", path.stem)
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise c.fail("suite.name", f"must be a short name of letters, digits, '.', '_', '-', got {name!r}")
    description = c.string(meta.get("description", ""), "suite.description", 2000, empty=True)
    if "cases" not in meta:
        raise c.fail("suite.cases", "is missing (a JSONL file relative to the suite file)")
    cases_rel = c.string(meta["cases"], "suite.cases", 1000)

    refusal = _parse_refusal(c, data["refusal"]) if "refusal" in data else None

    fmt_tables = data.get("formats", {})
    c.table(fmt_tables, "formats", FORMAT_OPTIONS)
    if not fmt_tables:
        raise c.fail("formats", f"needs at least one [formats.<name>] table; allowed names: "
                                f"{_allowed(FORMAT_OPTIONS)}")
    formats = {fname: _parse_format(c, fname, table, refusal) for fname, table in sorted(fmt_tables.items())}

    raw_gates = meta.get("gates", [])
    if not isinstance(raw_gates, list):
        raise c.fail("suite.gates", "must be a list of strings like 'xml_parse_rate >= 0.95'")
    if len(raw_gates) > MAX_GATES:
        raise c.fail("suite.gates", f"has {len(raw_gates)} gates, over the limit of {MAX_GATES}")
    gates = tuple(_parse_gate(c, g, f"suite.gates[{i}]") for i, g in enumerate(raw_gates))

    cases_path = path.parent / cases_rel
    cases_bytes = _read_cases_file(cases_path, c)
    cases = parse_cases(cases_bytes, cases_path, formats, path)

    if refusal is None:
        first = next((case for case in cases if case.gold.refuse), None)
        if first is not None:
            raise c.fail("refusal", f"is missing but case {first.id!r} (line {first.line} of "
                                    f"{cases_path}) has gold.refuse = true")
    for i, gate in enumerate(gates):
        _check_gate_applies(c, gate, f"suite.gates[{i}]", cases)

    digest = hashlib.sha256()
    for part in (toml_bytes, cases_bytes):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return Suite(name=name, path=path, description=description, formats=formats, refusal=refusal,
                 gates=gates, cases=cases, sha256=digest.hexdigest(), cases_path=cases_path)


def _read_cases_file(cases_path: Path, c: _Checker) -> bytes:
    if not cases_path.is_file():
        raise c.fail("suite.cases", f"names {cases_path}, which is not there")
    size = cases_path.stat().st_size
    if size > MAX_CASES_BYTES:
        raise BadInput(f"cases file {cases_path}: {size} bytes, over the limit of {MAX_CASES_BYTES}")
    try:
        return cases_path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cases file {cases_path}: cannot be read: {exc}") from None


def _package_dir() -> Path:
    return Path(str(resources.files(__package__)))


def builtin_suites() -> list[str]:
    """Names of the suite files shipped in this package (TOMLs with a [suite] table)."""
    names = []
    for p in sorted(_package_dir().glob("*.toml")):
        try:
            if "suite" in tomllib.loads(p.read_text(encoding="utf-8")):
                names.append(p.stem)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
    return names


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a suite by built-in name (``triage``) or by path to its TOML file."""
    given = Path(name_or_path)
    if given.suffix == ".toml" or given.exists() or "/" in str(name_or_path):
        path = given
    else:
        path = _package_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise BadInput(f"suite '{name_or_path}' not found; built-in suites: "
                           f"{', '.join(builtin_suites())}, or pass a path to a .toml file")
    if not path.is_file():
        raise BadInput(f"suite {path}: no such file; pass a built-in name "
                       f"({', '.join(builtin_suites())}) or a path to a .toml file")
    try:
        size = path.stat().st_size
        if size > MAX_TOML_BYTES:
            raise BadInput(f"suite {path}: {size} bytes, over the limit of {MAX_TOML_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"suite {path}: cannot be read: {exc}") from None
    return parse_suite(data, path)
