"""An eval suite's records: formats and their settings, cases with their gold labels, gates, and the
``Suite`` they make.  ``edgequant.profiles.suites`` validates a suite file into these (see its doc for the
file format); the gate metrics are the names ``edgequant.bench.quality`` computes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgequant.core.errors import BadInput


DEFAULT_XML_REQUIRED = ("differential", "danger_signs", "investigations", "referral")
DEFAULT_PROSE_HEADINGS = ("Differential", "Danger signs", "Investigations", "Referral")
# Positional meaning of the array format's elements (the first `length` are used).
ARRAY_FIELDS = ("differential", "danger_signs", "investigations", "referral")


@dataclass(frozen=True)
class FormatOptions:
    """What a format's ``[formats.<name>]`` table may set beyond the common fields."""

    options: tuple[str, ...]
    refusal_shape: str | None  # how a refusal looks in this format; None: cannot refuse


# One entry per format; bench.parsers registers one parser under the same name.
FORMAT_OPTIONS: dict[str, FormatOptions] = {
    "xml": FormatOptions(("required",), "<triage><refusal>SENTENCE</refusal></triage>"),
    "array": FormatOptions(("length",), '["SENTENCE"] (a one-element array)'),
    "prose": FormatOptions(("headings",), "the sentence alone, with none of the headings"),
    "esi": FormatOptions((), None),
}
FORMATS = tuple(sorted(FORMAT_OPTIONS))
_GATE_FIXED = ("esi_exact", "esi_adjacent", "referral_accuracy", "refusal_compliance", "over_refusal",
               "referral_agreement", "esi_agreement", "differential_jaccard", "top1_agreement",
               "mean_kld")
# formats whose answers carry a gold label (a referral or an ESI level)
_LABELLED_FORMATS = ("array", "esi", "prose", "xml")
GATE_METRICS: tuple[str, ...] = (tuple(f"{f}_parse_rate" for f in FORMATS)
                                 + tuple(f"{f}_valid_but_wrong" for f in _LABELLED_FORMATS) + _GATE_FIXED)
# metrics with a right/wrong outcome per case, so a rung can be compared with the reference case by
# case (flips, relative gates)
PAIRED_METRICS: tuple[str, ...] = (tuple(f"{f}_parse_rate" for f in FORMATS)
                                   + tuple(f"{f}_valid_but_wrong" for f in _LABELLED_FORMATS)
                                   + ("esi_exact", "esi_adjacent", "referral_accuracy", "refusal_compliance",
                                      "over_refusal"))
# rates where a higher value is worse; a relative gate on one is written `<= ref + margin`
LOWER_IS_BETTER: frozenset[str] = frozenset({"over_refusal", "mean_kld"}
                                            | {f"{f}_valid_but_wrong" for f in _LABELLED_FORMATS})
GATE_OPS = (">=", ">", "<=", "<")
DEFAULT_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class RefusalSpec:
    """The scope refusal sentence and the patterns of treatment/dosing content.

    ``forbidden`` keeps the compiled patterns (case-insensitive) in file order;
    ``forbidden_sources`` the pattern strings as written.
    """

    text: str
    forbidden: tuple[re.Pattern, ...] = ()
    forbidden_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class FormatSpec:
    """How prompts of one format are posed and how the answers are parsed.

    ``required`` is used by xml, ``length`` by array, ``headings`` by prose;
    the others ignore them.  ``refusal`` is the suite's refusal spec, carried
    here so a parser needs nothing but the spec.
    """

    name: str
    system: str
    few_shot: str
    max_tokens: int
    max_bytes: int = DEFAULT_MAX_BYTES
    stop: tuple[str, ...] = ()
    required: tuple[str, ...] = DEFAULT_XML_REQUIRED
    length: int = 4
    headings: tuple[str, ...] = DEFAULT_PROSE_HEADINGS
    refusal: RefusalSpec | None = None

    def completion_prompt(self, prompt: str) -> str:
        """The few-shot block with the case prompt where ``{prompt}`` stands."""
        return self.few_shot.replace("{prompt}", prompt, 1)

    @property
    def refusal_shape(self) -> str | None:
        return FORMAT_OPTIONS[self.name].refusal_shape


@dataclass(frozen=True)
class Gold:
    esi: int | None = None
    referral: bool | None = None
    refuse: bool = False


@dataclass(frozen=True)
class Case:
    id: str
    format: str
    prompt: str
    gold: Gold = field(default_factory=Gold)
    line: int = 0  # line in the cases file, for messages


@dataclass(frozen=True)
class Gate:
    """``metric op value`` (absolute), or with ``relative`` ``metric >= ref - value`` (value = the
    non-inferiority margin; ``<= ref + value`` for a lower-is-better metric)."""

    metric: str
    op: str
    value: float
    relative: bool = False

    @property
    def kind(self) -> str:
        return "relative" if self.relative else "absolute"

    def passes(self, measured: float) -> bool:
        if self.op == ">=":
            return measured >= self.value
        if self.op == ">":
            return measured > self.value
        if self.op == "<=":
            return measured <= self.value
        return measured < self.value

    def __str__(self) -> str:
        if self.relative:
            return f"{self.metric} {self.op} ref {'-' if self.op == '>=' else '+'} {self.value:g}"
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    formats: dict[str, FormatSpec]
    refusal: RefusalSpec | None
    gates: tuple[Gate, ...]
    cases: tuple[Case, ...]
    sha256: str  # over the TOML bytes and the cases bytes
    cases_path: Path | None = None

    def cases_of(self, fmt: str) -> tuple[Case, ...]:
        return tuple(c for c in self.cases if c.format == fmt)

    def limited(self, per_format: int) -> "Suite":
        """The first ``per_format`` cases of each format, in file order: a subset for a quick eval of a
        large model.  Its identity (sha256) differs from the whole suite's, so cached reference outputs of
        one are never taken for the other."""
        if per_format < 1:
            raise BadInput(f"--limit must be at least 1 (cases per format), not {per_format}")
        seen: dict[str, int] = {}
        kept = []
        for case in self.cases:
            if seen.get(case.format, 0) < per_format:
                seen[case.format] = seen.get(case.format, 0) + 1
                kept.append(case)
        if len(kept) == len(self.cases):
            return self
        digest = hashlib.sha256(f"{self.sha256}\0limit={per_format}".encode()).hexdigest()
        return replace(self, cases=tuple(kept), sha256=digest)

    def spec(self, case: Case) -> FormatSpec:
        return self.formats[case.format]

    def completion_prompt(self, case: Case) -> str:
        """Text for a base model: the format's few-shot block around the case prompt."""
        return self.formats[case.format].completion_prompt(case.prompt)

    def chat_messages(self, case: Case) -> list[dict[str, str]]:
        """Messages for an instruction-tuned model: the format's system prompt, then the case."""
        return [{"role": "system", "content": self.formats[case.format].system},
                {"role": "user", "content": case.prompt}]

    def with_gates(self, extra: tuple[Gate, ...]) -> "Suite":
        """The suite with a profile's gates added: those it can measure and does not already have."""
        have = {str(g) for g in self.gates}
        add = tuple(g for g in extra if str(g) not in have and gate_need(g, self.cases) is None)
        return replace(self, gates=self.gates + add) if add else self


def gate_need(gate: Gate, cases: tuple[Case, ...]) -> str | None:
    """What the cases lack for the gate to be measured (None: they have it)."""
    formats = {case.format for case in cases}
    need = None
    if gate.metric.endswith("_valid_but_wrong"):
        fmt = gate.metric.removesuffix("_valid_but_wrong")
        if not any(case.format == fmt and (case.gold.esi is not None or (case.gold.referral is not None
                                                                          and not case.gold.refuse))
                   for case in cases):
            need = f"{fmt} cases with a gold referral or ESI level"
    elif gate.metric == "over_refusal":
        if not any(not case.gold.refuse for case in cases):
            need = "in-scope cases (without gold.refuse)"
    elif gate.metric.endswith("_parse_rate"):
        fmt = gate.metric.removesuffix("_parse_rate")
        if fmt not in formats:
            need = f"cases of format {fmt}"
    elif gate.metric in ("esi_exact", "esi_adjacent"):
        if not any(case.gold.esi is not None for case in cases):
            need = "esi cases with gold.esi"
    elif gate.metric == "esi_agreement":
        if "esi" not in formats:
            need = "esi cases"
    elif gate.metric == "referral_accuracy":
        if not any(case.gold.referral is not None for case in cases):
            need = "cases with gold.referral"
    elif gate.metric == "refusal_compliance":
        if not any(case.gold.refuse for case in cases):
            need = "cases with gold.refuse = true"
    elif gate.metric in ("referral_agreement", "differential_jaccard", "top1_agreement"):
        if not formats & {"xml", "array", "prose"}:
            need = "xml, array or prose cases"
    return need
