"""Read model answers in the suite formats the phone app parses; never raise, never hang.

Every parser takes the raw model output (bytes or str: possibly invalid UTF-8,
gigantic or hostile) and the case's ``FormatSpec``, and returns a
``ParseResult``.  The common steps live in ``register``'s wrapper, so a parser
only reads text:

1. size cap: an output over ``spec.max_bytes`` fails before anything reads it;
2. decoding with ``errors="replace"``; a packet whose extracted fields contain
   a replaced byte fails ("not valid UTF-8"), bytes outside the packet are
   tolerated (chatter, a character cut at the token limit);
3. refusal detection over the whole output (``detect_refusal``);
4. the parser itself, with any unexpected exception turned into a failed parse.

``ok`` means the app could read the answer as a packet of the format: either
a full packet or the format's refusal shape.  ``refusal`` says whether the
output is a compliant scope refusal (the sentence present, no treatment or
dosing content anywhere), whatever its shape.  A scorer combines the two with
the case's gold (a compliant refusal in shape is the right answer to a
``gold.refuse`` case and an over-refusal otherwise).  ``forbidden`` lists the
treatment/dosing snippets found, for leak reporting on any case.

Refusal shapes: xml ``<triage><refusal>SENTENCE</refusal></triage>``; array a
one-element array ``["SENTENCE"]``; prose the sentence with none of the
headings; esi has none.

Adding a format: one function decorated with ``@register("name")`` here, plus
its settings entry in ``edgequant.profiles.suites.FORMAT_OPTIONS``.
"""

from __future__ import annotations

import functools
import html
import json
import re
from dataclasses import dataclass, field, replace
from typing import Callable
from xml.parsers import expat

from edgequant.profiles.suite_records import ARRAY_FIELDS, FormatSpec, RefusalSpec

MAX_XML_DEPTH = 8          # <triage><differential><item> is 3
MAX_XML_ELEMENTS = 1000
MAX_JSON_DEPTH = 8         # the positional array is 2 deep
MAX_FORBIDDEN_REPORTED = 10


@dataclass(frozen=True)
class ParseResult:
    """One parsed answer.

    ``fields`` holds what the packet says (differential, danger_signs,
    investigations as lists of strings, referral as bool, esi as int), or
    ``{"refusal_text": ...}`` for an answer in the format's refusal shape.
    ``reason`` says why ``ok`` is False, or why a refusal-shaped answer is not
    a compliant refusal; it is None otherwise.
    """

    ok: bool
    fields: dict = field(default_factory=dict)
    reason: str | None = None
    refusal: bool = False
    forbidden: tuple[str, ...] = ()


def _fail(reason: str) -> ParseResult:
    return ParseResult(ok=False, fields={}, reason=reason)


def _good(fields: dict) -> ParseResult:
    return ParseResult(ok=True, fields=fields)


# ---------------------------------------------------------------------------
# decoding


class OutputTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Decoded:
    text: str
    size: int            # bytes
    invalid_utf8: bool   # some bytes were not UTF-8 and became U+FFFD in text


def decode_output(output: bytes | bytearray | memoryview | str, max_bytes: int) -> Decoded:
    """Model output as text: the size cap first, then UTF-8 with errors="replace".

    Raises OutputTooLarge over the cap and TypeError for anything but bytes or str.
    A str is measured and checked as its UTF-8 encoding (lone surrogates count as
    invalid), so bytes and str outputs are judged the same way.
    """
    if isinstance(output, str):
        if len(output) > max_bytes:  # every character is at least one byte
            raise OutputTooLarge(f"output is {len(output)} characters, over the {max_bytes}-byte limit")
        output = output.encode("utf-8", "surrogatepass")
    elif isinstance(output, (bytearray, memoryview)):
        output = bytes(output)
    elif not isinstance(output, bytes):
        raise TypeError(f"model output must be bytes or str, got {type(output).__name__}")
    if len(output) > max_bytes:
        raise OutputTooLarge(f"output is {len(output)} bytes, over the {max_bytes}-byte limit")
    try:
        return Decoded(output.decode("utf-8"), len(output), False)
    except UnicodeDecodeError:
        return Decoded(output.decode("utf-8", errors="replace"), len(output), True)


# ---------------------------------------------------------------------------
# refusal detection

_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_WORD = re.compile(r"[a-z0-9]+")


def _normalize(text: str) -> str:
    """Lower-case words separated by single spaces; markup, quotes and escapes dropped."""
    text = _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    text = html.unescape(text)
    text = _APOSTROPHES.sub("", text.lower())
    return " ".join(_WORD.findall(text))


def contains_refusal_sentence(text: str, refusal: RefusalSpec | None) -> bool:
    if refusal is None:
        return False
    sentence = _normalize(refusal.text)
    return bool(sentence) and f" {sentence} " in f" {_normalize(text)} "


_BLANKS = re.compile(r"\s+")


def forbidden_content(text: str, refusal: RefusalSpec | None) -> tuple[str, ...]:
    r"""The treatment/dosing snippets (one per matching pattern) found in text.

    Patterns see the text with every whitespace run collapsed to one space: that
    is what "500  mg" and "500\nmg" mean, and it keeps patterns such as
    ``\d+\s*-?\s*hourly`` from backtracking for minutes over a run of blanks.
    """
    if refusal is None or not refusal.forbidden:
        return ()
    flat = _BLANKS.sub(" ", text)
    found = []
    for rx in refusal.forbidden:
        m = rx.search(flat)
        if m:
            found.append(m.group(0)[:80])
            if len(found) >= MAX_FORBIDDEN_REPORTED:
                break
    return tuple(found)


def detect_refusal(text: str, refusal: RefusalSpec | None) -> tuple[bool, tuple[str, ...]]:
    """(compliant refusal?, forbidden snippets): the sentence is there and nothing forbidden is."""
    forbidden = forbidden_content(text, refusal)
    return contains_refusal_sentence(text, refusal) and not forbidden, forbidden


# ---------------------------------------------------------------------------
# shared readers

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,3}[.)])\s*")
_SPLIT = re.compile(r"[;,\n]")


def split_items(text: str) -> list[str]:
    """Items of a list written as text: split on ';', ',' and newlines, bullets dropped."""
    out = []
    for part in _SPLIT.split(text):
        item = _BULLET.sub("", part).strip().strip(".").strip()
        if item:
            out.append(item)
    return out


_NEGATIVE_PHRASES = ("not required", "not needed", "not indicated", "not necessary", "no referral",
                     "no need")
_POSITIVE_FIRST = frozenset({"yes", "refer", "referral", "referred", "urgent", "urgently", "immediate",
                             "immediately", "emergency"})
_NEGATIVE_FIRST = frozenset({"no", "not", "none"})


def referral_decision(text: str) -> bool | None:
    """yes/refer/urgent -> True, no/not required -> False, anything else -> None."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] in _NEGATIVE_FIRST:
        return False
    joined = " ".join(words)
    if any(p in joined for p in _NEGATIVE_PHRASES):
        return False
    if words[0] in _POSITIVE_FIRST:
        return True
    return None


def _has_replacement(value) -> bool:
    if isinstance(value, str):
        return "\ufffd" in value
    if isinstance(value, dict):
        return any(_has_replacement(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_replacement(v) for v in value)
    return False


# ---------------------------------------------------------------------------
# registry

Parser = Callable[[bytes | str, FormatSpec], ParseResult]
PARSERS: dict[str, Parser] = {}


def register(name: str):
    """Register ``core(decoded, spec) -> ParseResult`` as the parser of format ``name``.

    The registered (and returned) function takes raw output and the spec and
    does the common steps of the module docstring around ``core``.
    """
    def wrap(core: Callable[[Decoded, FormatSpec], ParseResult]) -> Parser:
        @functools.wraps(core)
        def parser(output: bytes | str, spec: FormatSpec) -> ParseResult:
            try:
                decoded = decode_output(output, spec.max_bytes)
            except (OutputTooLarge, TypeError) as exc:
                return _fail(str(exc))
            try:
                refused, forbidden = detect_refusal(decoded.text, spec.refusal)
                result = core(decoded, spec)
            except Exception as exc:  # a parser must not stop a benchmark run
                return _fail(f"parser error: {type(exc).__name__}: {exc}")
            if result.ok and decoded.invalid_utf8 and _has_replacement(result.fields):
                result = _fail("packet is not valid UTF-8")
            reason = result.reason
            if result.ok and "refusal_text" in result.fields and not refused:
                reason = (f"refusal with treatment/dosing content: {', '.join(repr(f) for f in forbidden)}"
                          if forbidden else "refusal shape without the scope refusal sentence")
            return replace(result, reason=reason, refusal=refused, forbidden=forbidden)

        PARSERS[name] = parser
        return parser

    return wrap


def parse(format: str, output: bytes | str, spec: FormatSpec) -> ParseResult:
    """Parse one model output as ``format``; unknown formats fail, nothing raises."""
    parser = PARSERS.get(format)
    if parser is None:
        return _fail(f"no parser for format {format!r}; known: {', '.join(sorted(PARSERS))}")
    return parser(output, spec)


# ---------------------------------------------------------------------------
# xml

_DTD = re.compile(r"<!\s*(?:DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)", re.IGNORECASE)
_TRIAGE_OPEN = re.compile(r"<triage(?=[\s>])")
_TRIAGE_CLOSE = re.compile(r"</triage\s*>")


class _Reject(Exception):
    pass


class _Node:
    __slots__ = ("name", "parts", "children")

    def __init__(self, name: str):
        self.name = name
        self.parts: list[str] = []
        self.children: list[_Node] = []

    def text(self) -> str:
        return "".join(self.parts + [c.text() for c in self.children]).strip()


def _reject_dtd(*_args):
    raise _Reject("DTD/entities not allowed")


def _xml_tree(packet: str) -> _Node:
    """Parse with expat: no DTD, no entities beyond the five predefined, bounded depth and size."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _reject_dtd
    parser.EntityDeclHandler = _reject_dtd
    parser.UnparsedEntityDeclHandler = _reject_dtd
    parser.ExternalEntityRefHandler = _reject_dtd
    parser.buffer_text = True
    stack: list[_Node] = []
    done: list[_Node] = []
    count = 0

    def start(name, _attrs):
        nonlocal count
        count += 1
        if count > MAX_XML_ELEMENTS:
            raise _Reject(f"more than {MAX_XML_ELEMENTS} elements")
        if len(stack) >= MAX_XML_DEPTH:
            raise _Reject(f"elements nested deeper than {MAX_XML_DEPTH}")
        node = _Node(name)
        if stack:
            stack[-1].children.append(node)
        stack.append(node)

    def end(_name):
        node = stack.pop()
        if not stack:
            done.append(node)

    def chars(data):
        if stack:
            stack[-1].parts.append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.Parse(packet, True)
    return done[0]


@register("xml")
def parse_xml(decoded: Decoded, spec: FormatSpec) -> ParseResult:
    """The first ``<triage>…</triage>`` packet in the output, with the required children."""
    text = decoded.text
    if _DTD.search(text):
        return _fail("DTD/entities not allowed")
    opened = _TRIAGE_OPEN.search(text)
    if opened is None:
        return _fail("no <triage> packet in the output")
    closed = _TRIAGE_CLOSE.search(text, opened.end())
    if closed is None:
        return _fail("truncated packet: <triage> without </triage>")
    try:
        root = _xml_tree(text[opened.start():closed.end()])
    except _Reject as exc:
        return _fail(str(exc))
    except expat.ExpatError as exc:
        return _fail(f"malformed XML: {expat.ErrorString(exc.code)} (line {exc.lineno}, column {exc.offset})")
    children: dict[str, _Node] = {}
    for child in root.children:
        children.setdefault(child.name, child)
    if "refusal" in children:
        return _good({"refusal_text": children["refusal"].text()})
    missing = [name for name in spec.required if name not in children]
    if missing:
        return _fail(f"missing <{missing[0]}> in the <triage> packet")
    fields: dict = {}
    for name in spec.required:
        node = children[name]
        if name == "referral":
            decision = referral_decision(node.text())
            if decision is None:
                return _fail(f"referral {node.text()[:60]!r} is neither yes/refer/urgent nor no/not required")
            fields[name] = decision
        else:
            items = [c.text() for c in node.children if c.name == "item"]
            fields[name] = [i for i in items if i] if items else split_items(node.text())
    return _good(fields)


# ---------------------------------------------------------------------------
# array

_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def _extract_array(text: str) -> tuple[str | None, str | None]:
    """From the first '[' to its matching ']', skipping brackets inside JSON strings."""
    start = text.find("[")
    if start < 0:
        return None, "no JSON array in the output"
    depth, in_string, skip_to = 0, False, -1
    for m in _JSON_SPECIAL.finditer(text, start):
        pos, ch = m.start(), m.group()
        if pos < skip_to:
            continue
        if in_string:
            if ch == "\\":
                skip_to = pos + 2
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return None, f"JSON nested deeper than {MAX_JSON_DEPTH}"
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return text[start:pos + 1], None
    return None, "truncated array: no matching ']'"


@register("array")
def parse_array(decoded: Decoded, spec: FormatSpec) -> ParseResult:
    """A positional JSON array: differential, danger_signs, investigations, referral."""
    snippet, problem = _extract_array(decoded.text)
    if snippet is None:
        return _fail(problem)
    try:
        value = json.loads(snippet)
    except (ValueError, RecursionError) as exc:
        return _fail(f"malformed JSON array: {exc}")
    if not isinstance(value, list):
        return _fail("not a JSON array")
    if len(value) == 1 and isinstance(value[0], str):
        return _good({"refusal_text": value[0]})
    if len(value) != spec.length:
        return _fail(f"array has {len(value)} elements, expected {spec.length}")
    fields: dict = {}
    for position, (name, element) in enumerate(zip(ARRAY_FIELDS, value), start=1):
        if name == "referral":
            decision = element if isinstance(element, bool) else (
                referral_decision(element) if isinstance(element, str) else None)
            if decision is None:
                return _fail(f"element {position} (referral) {str(element)[:60]!r} is neither "
                             f"true/yes/refer/urgent nor false/no/not required")
            fields[name] = decision
        elif isinstance(element, list) and all(isinstance(x, str) for x in element):
            fields[name] = [x.strip() for x in element if x.strip()]
        elif isinstance(element, str):
            fields[name] = split_items(element)
        else:
            return _fail(f"element {position} ({name}) must be a list of strings, "
                         f"got {type(element).__name__}")
    return _good(fields)


# ---------------------------------------------------------------------------
# prose


@functools.lru_cache(maxsize=256)
def _words_pattern(heading: str) -> re.Pattern:
    # literal words separated by blanks: no two quantifiers compete for the same characters
    return re.compile(r"[ \t]+".join(re.escape(w) for w in heading.split()), re.IGNORECASE)


def _strip_mark(s: str) -> str:
    """Drop one bold mark (** or __) and the blanks around it from the start of s."""
    s = s.lstrip(" \t")
    if s.startswith(("**", "__")):
        s = s[2:].lstrip(" \t")
    return s


def _heading_line(line: str, headings: tuple[str, ...]) -> tuple[int, int] | None:
    """(heading index, offset of the text after the heading) if the line is a heading line.

    Accepted: ``Heading:`` (text may follow on the line) and ``## Heading`` alone on
    its line, case-insensitive, with optional bold marks.  String operations and
    anchored literal matches only, so a line of 60,000 blanks costs linear time.
    """
    s = line.lstrip(" \t")
    hashes = len(s) - len(s.lstrip("#"))
    if hashes > 6:
        return None
    s = _strip_mark(s[hashes:])
    for index, heading in enumerate(headings):
        m = _words_pattern(heading).match(s)
        if m is None:
            continue
        rest = _strip_mark(s[m.end():])
        if rest.startswith(":"):
            after = rest[1:]
            after = after.lstrip(" \t")
            if after.startswith(("**", "__")):
                after = after[2:]
            return index, len(line) - len(after)
        if hashes and not rest.strip():
            return index, len(line)
    return None


def _field_name(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")


@register("prose")
def parse_prose(decoded: Decoded, spec: FormatSpec) -> ParseResult:
    """The required headings in order, each with text under it."""
    text = decoded.text
    headings = spec.headings
    # every heading line in text order: (line start, heading index, body start)
    occurrences: list[tuple[int, int, int]] = []
    offset = 0
    for line in text.split("\n"):
        hit = _heading_line(line, headings)
        if hit is not None:
            occurrences.append((offset, hit[0], offset + hit[1]))
        offset += len(line) + 1
    if not occurrences:
        if contains_refusal_sentence(text, spec.refusal):
            return _good({"refusal_text": text.strip()})
        return _fail(f"none of the headings {', '.join(headings)} found")
    found: list[tuple[int, int, int]] = []
    cursor = -1
    for index, heading in enumerate(headings):
        hit = next((o for o in occurrences if o[1] == index and o[0] > cursor), None)
        if hit is None:
            if found and any(o[1] == index for o in occurrences):
                return _fail(f"heading {heading!r} is out of order (it comes before {headings[index - 1]!r})")
            return _fail(f"missing heading {heading!r}")
        found.append(hit)
        cursor = hit[0]
    sections: dict[str, str] = {}
    for i, (_, index, body_start) in enumerate(found):
        body_end = found[i + 1][0] if i + 1 < len(found) else len(text)
        body = text[body_start:body_end].strip()
        if not body:
            return _fail(f"section {headings[index]!r} is empty")
        sections[headings[index]] = body
    fields: dict = {}
    for heading, body in sections.items():
        name = _field_name(heading)
        if name == "referral":
            decision = referral_decision(body)
            if decision is None:
                return _fail(f"Referral section {body[:60]!r} does not start with yes/refer/urgent "
                             f"or no/not required")
            fields[name] = decision
        else:
            fields[name] = split_items(body)
    fields["sections"] = sections
    return _good(fields)


# ---------------------------------------------------------------------------
# esi

_ESI_EXTRACTION = re.compile(r"^[ \t]*(?:#+[ \t]*)?(?:\*\*)?EXTRACTION(?:\*\*)?[ \t]*:", re.I | re.M)
_ESI_ALGORITHM = re.compile(r"^[ \t]*(?:#+[ \t]*)?(?:\*\*)?ESI[ \t]+ALGORITHM(?:\*\*)?[ \t]*:", re.I | re.M)
_ESI_ANSWER = re.compile(r"\bANSWER(?:\*\*)?[ \t]*:[ \t]*(?:\*\*)?[ \t]*(?:ESI[ \t-]*(\d+))?", re.I)


@register("esi")
def parse_esi(decoded: Decoded, spec: FormatSpec) -> ParseResult:
    """EXTRACTION:, then ESI ALGORITHM:, then ``ANSWER: ESI n`` with n in 1..5."""
    text = decoded.text
    extraction = _ESI_EXTRACTION.search(text)
    if extraction is None:
        return _fail("missing EXTRACTION: section")
    algorithm = _ESI_ALGORITHM.search(text, extraction.end())
    if algorithm is None:
        return _fail("missing ESI ALGORITHM: section after EXTRACTION:")
    answer = _ESI_ANSWER.search(text, algorithm.end())
    if answer is None:
        return _fail("missing 'ANSWER: ESI n' after ESI ALGORITHM:")
    digits = answer.group(1)
    if digits is None:
        return _fail("ANSWER: is not followed by 'ESI n'")
    if len(digits) > 1 or not 1 <= int(digits) <= 5:
        return _fail(f"ANSWER: ESI {digits[:6]} is not a level 1-5")
    return _good({"esi": int(digits)})
