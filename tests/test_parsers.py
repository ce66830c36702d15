"""Parsers read good packets, fail realistic broken ones with a reason, and survive hostile output."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from edgequant.bench import parsers
from edgequant.bench.parsers import PARSERS, ParseResult, decode_output, parse, referral_decision
from edgequant.profiles.suite_records import FORMAT_OPTIONS
from edgequant.profiles.suites import load_suite

SENTENCE = ("Treatment and dosing recommendations are outside the scope of this tool. "
            "Please refer to your facility's Uganda Clinical Guidelines.")


@pytest.fixture(scope="module")
def suite():
    return load_suite("triage")


@pytest.fixture(scope="module")
def xml(suite):
    return suite.formats["xml"]


@pytest.fixture(scope="module")
def array(suite):
    return suite.formats["array"]


@pytest.fixture(scope="module")
def prose(suite):
    return suite.formats["prose"]


@pytest.fixture(scope="module")
def esi(suite):
    return suite.formats["esi"]


def failed(result: ParseResult, *words: str) -> None:
    assert isinstance(result, ParseResult)
    assert result.ok is False and result.reason, result
    for word in words:
        assert word in result.reason, result.reason


# ---------------------------------------------------------------------------
# registry


def test_registry_has_one_parser_per_suite_format():
    assert set(PARSERS) == set(FORMAT_OPTIONS)


def test_unknown_format_fails_without_raising(xml):
    failed(parse("yaml", "<triage/>", xml), "no parser for format 'yaml'", "array, esi, prose, xml")


def test_worked_examples_in_the_builtin_few_shots_parse(suite):
    """The suite teaches base models by example; every example must be a packet our parsers accept."""
    for name, spec in suite.formats.items():
        blocks = spec.few_shot.split("\nCase: ")[1:-1]  # the last block is the case slot
        assert len(blocks) == 2, name
        kinds = []
        for block in blocks:
            answer = re.sub(r"^(Packet|Answer|Assessment):", "", block.split("\n", 1)[1]).strip()
            result = parse(name, answer, spec)
            assert result.ok, (name, result)
            kinds.append(result.refusal)
            if result.refusal:
                assert result.fields == {"refusal_text": SENTENCE}
        assert kinds == ([False, True] if name != "esi" else [False, False]), name


# ---------------------------------------------------------------------------
# xml

GOOD_XML = ("<triage><differential>severe malaria; bacterial meningitis</differential>"
            "<danger_signs>convulsions; unable to drink</danger_signs>"
            "<investigations>malaria RDT; blood glucose</investigations>"
            "<referral>Yes - urgent referral to hospital</referral></triage>")


def test_xml_good_packet_with_chatter_around_it(xml):
    out = "Sure, here is the packet:\n```xml\n" + GOOD_XML + "\n```\nHope this helps. <triage>junk"
    r = parse("xml", out, xml)
    assert r.ok and r.reason is None and not r.refusal
    assert r.fields == {"differential": ["severe malaria", "bacterial meningitis"],
                        "danger_signs": ["convulsions", "unable to drink"],
                        "investigations": ["malaria RDT", "blood glucose"], "referral": True}


def test_xml_item_children_newlines_and_commas(xml):
    out = ("<triage>\n  <differential><item>Pneumonia</item><item> malaria </item></differential>\n"
           "  <danger_signs>\n- chest indrawing\n- fast breathing, grunting\n</danger_signs>\n"
           "  <investigations>1. pulse oximetry</investigations>\n"
           "  <referral>Not required</referral>\n</triage>")
    r = parse("xml", out.encode(), xml)
    assert r.ok, r
    assert r.fields["differential"] == ["Pneumonia", "malaria"]
    assert r.fields["danger_signs"] == ["chest indrawing", "fast breathing", "grunting"]
    assert r.fields["investigations"] == ["pulse oximetry"]
    assert r.fields["referral"] is False


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("yes - refer today", True), ("Refer to hospital", True), ("URGENT", True),
    ("Urgent referral to HC IV", True), ("Immediately", True), ("No", False), ("no.", False),
    ("Not required", False), ("Referral not required", False), ("None", False),
    ("maybe later", None), ("", None), ("consider", None),
])
def test_referral_decision(text, expected):
    assert referral_decision(text) is expected


@pytest.mark.parametrize("mutate, words", [
    (lambda s: s[:-len("</triage>")], ["truncated", "</triage>"]),
    (lambda s: s[:80], ["truncated"]),
    (lambda s: s.replace("<investigations>malaria RDT; blood glucose</investigations>", ""),
     ["missing <investigations>"]),
    (lambda s: s.replace("</danger_signs>", ""), ["malformed XML", "mismatched tag"]),
    (lambda s: s.replace("Yes - urgent referral to hospital", "Consider"), ["referral 'Consider'"]),
    (lambda s: s.replace("<referral>", "<referral>Maybe ").replace("Yes - urgent referral to hospital", ""),
     ["referral"]),
    (lambda s: "The patient needs malaria tests and referral.", ["no <triage> packet"]),
    (lambda s: s.replace("severe malaria", "malaria & fever"), ["malformed XML"]),
    (lambda s: s.replace("severe malaria", "&nbsp;"), ["malformed XML", "undefined entity"]),
    (lambda s: "", ["no <triage> packet"]),
])
def test_xml_broken_outputs_fail_with_reason(xml, mutate, words):
    failed(parse("xml", mutate(GOOD_XML), xml), *words)


def test_xml_required_children_come_from_the_spec(xml):
    spec = dataclasses.replace(xml, required=("differential", "red_flags"))
    failed(parse("xml", GOOD_XML, spec), "missing <red_flags>")
    r = parse("xml", GOOD_XML.replace("danger_signs", "red_flags"), spec)
    assert r.ok and r.fields == {"differential": ["severe malaria", "bacterial meningitis"],
                                 "red_flags": ["convulsions", "unable to drink"]}


# ---------------------------------------------------------------------------
# array

GOOD_ARRAY = ('[["severe pneumonia", "malaria"], ["chest indrawing", "unable to drink"], '
              '["pulse oximetry"], true]')


def test_array_good_with_chatter(array):
    r = parse("array", "Answer: " + GOOD_ARRAY + "\nCase: next [1]", array)
    assert r.ok, r
    assert r.fields == {"differential": ["severe pneumonia", "malaria"],
                        "danger_signs": ["chest indrawing", "unable to drink"],
                        "investigations": ["pulse oximetry"], "referral": True}


def test_array_strings_for_lists_referral_words_and_brackets_inside_strings(array):
    out = '["malaria; typhoid", ["fever ]] for [3 days", "say \\"hi\\" ["], [], "No - manage here"]'
    r = parse("array", out, array)
    assert r.ok, r
    assert r.fields["differential"] == ["malaria", "typhoid"]
    assert r.fields["danger_signs"] == ["fever ]] for [3 days", 'say "hi" [']
    assert r.fields["investigations"] == [] and r.fields["referral"] is False


@pytest.mark.parametrize("out, words", [
    ('[["malaria"], ["fever"], true]', ["3 elements, expected 4"]),
    ('[["a"], ["b"], ["c"], true, false]', ["5 elements, expected 4"]),
    ('[["malaria"], ["fever"], ["RDT"], ', ["truncated array"]),
    ('[["malaria"], ["fever"], ["RDT"], maybe]', ["malformed JSON"]),
    ('[["malaria"], ["fever"], ["RDT"], "perhaps"]', ["element 4 (referral)"]),
    ('[["malaria"], {"a": 1}, ["RDT"], true]', ["element 2 (danger_signs)", "dict"]),
    ('[["malaria", 3], ["x"], ["RDT"], true]', ["element 1 (differential)"]),
    ("Refer the child to hospital.", ["no JSON array"]),
    ("[1]", ["1 elements, expected 4"]),
])
def test_array_broken_outputs_fail_with_reason(array, out, words):
    failed(parse("array", out, array), *words)


def test_array_length_comes_from_the_spec(array):
    spec = dataclasses.replace(array, length=3)
    r = parse("array", '[["malaria"], ["fever"], ["RDT"]]', spec)
    assert r.ok and set(r.fields) == {"differential", "danger_signs", "investigations"}
    failed(parse("array", GOOD_ARRAY, spec), "4 elements, expected 3")


# ---------------------------------------------------------------------------
# prose

GOOD_PROSE = """Here is my assessment.
Differential: severe malaria; meningitis
Danger signs:
- convulsions
- lethargy
Investigations: malaria RDT, lumbar puncture
Referral: Yes - urgent, to hospital
"""


def test_prose_good_colon_form(prose):
    r = parse("prose", GOOD_PROSE, prose)
    assert r.ok, r
    assert r.fields["differential"] == ["severe malaria", "meningitis"]
    assert r.fields["danger_signs"] == ["convulsions", "lethargy"]
    assert r.fields["investigations"] == ["malaria RDT", "lumbar puncture"]
    assert r.fields["referral"] is True
    assert r.fields["sections"]["Referral"] == "Yes - urgent, to hospital"


def test_prose_markdown_headings_any_case(prose):
    out = ("## differential\nPneumonia\n\n## DANGER SIGNS\nnone\n\n**Investigations:** pulse oximetry\n\n"
           "### Referral\nNo, manage at this level.\n")
    r = parse("prose", out, prose)
    assert r.ok, r
    assert r.fields["differential"] == ["Pneumonia"] and r.fields["investigations"] == ["pulse oximetry"]
    assert r.fields["referral"] is False


@pytest.mark.parametrize("out, words", [
    (GOOD_PROSE.replace("Differential: severe malaria; meningitis\n", "")
     .replace("Investigations:", "Differential: severe malaria\nInvestigations:"), ["out of order"]),
    ("Danger signs: x\nDifferential: y\nInvestigations: z\nReferral: yes\n", ["'Danger signs' is out of order"]),
    (GOOD_PROSE.replace("Investigations: malaria RDT, lumbar puncture\n", ""), ["missing heading 'Investigations'"]),
    (GOOD_PROSE.replace("Investigations: malaria RDT, lumbar puncture", "Investigations:"),
     ["section 'Investigations' is empty"]),
    (GOOD_PROSE.replace("Yes - urgent, to hospital", "depends on the clinician"), ["Referral section"]),
    ("The child probably has malaria and should be tested.", ["none of the headings"]),
    ("## Differential diagnosis\nmalaria\nDanger signs: x\nInvestigations: y\nReferral: no\n",
     ["missing heading 'Differential'"]),
])
def test_prose_broken_outputs_fail_with_reason(prose, out, words):
    failed(parse("prose", out, prose), *words)


# ---------------------------------------------------------------------------
# esi

GOOD_ESI = """EXTRACTION:
- Chief complaint: chest pain
- Vital signs: BP 88/60, HR 118
- Red flags: hypotension
ESI ALGORITHM:
- Step A (lifesaving): no
- Step B (high-risk): yes, possible ACS
- Step C (resources): not needed
- Step D (vitals): not needed
ANSWER: ESI 2
"""


def test_esi_good(esi):
    r = parse("esi", GOOD_ESI, esi)
    assert r.ok and r.fields == {"esi": 2}
    r = parse("esi", "Assessment:\n" + GOOD_ESI.replace("ANSWER: ESI 2", "**Answer:** ESI-4"), esi)
    assert r.ok and r.fields == {"esi": 4}


@pytest.mark.parametrize("out, words", [
    (GOOD_ESI.replace("ANSWER: ESI 2", "ANSWER: ESI 7"), ["ESI 7 is not a level 1-5"]),
    (GOOD_ESI.replace("ANSWER: ESI 2", "ANSWER: ESI 0"), ["ESI 0"]),
    (GOOD_ESI.replace("ANSWER: ESI 2", "ANSWER: ESI 22"), ["ESI 22"]),
    (GOOD_ESI.replace("ANSWER: ESI 2", "ANSWER: level two"), ["not followed by 'ESI n'"]),
    (GOOD_ESI.replace("ANSWER: ESI 2\n", ""), ["missing 'ANSWER: ESI n'"]),
    (GOOD_ESI.replace("EXTRACTION:", "Findings:"), ["missing EXTRACTION:"]),
    (GOOD_ESI.replace("ESI ALGORITHM:", "Steps:"), ["missing ESI ALGORITHM:"]),
    ("ANSWER: ESI 2\n" + GOOD_ESI.split("ANSWER")[0], ["missing 'ANSWER: ESI n'"]),
    (GOOD_ESI[:150], ["missing"]),
    ("ANSWER: ESI " + "9" * 50_000, ["missing EXTRACTION:"]),
])
def test_esi_broken_outputs_fail_with_reason(esi, out, words):
    failed(parse("esi", out, esi), *words)


def test_esi_huge_number_is_rejected_without_int_conversion_errors(esi):
    out = GOOD_ESI.replace("ANSWER: ESI 2", "ANSWER: ESI " + "9" * 10_000)
    failed(parse("esi", out, esi), "is not a level 1-5")


# ---------------------------------------------------------------------------
# refusal detection


def test_refusal_shapes_are_compliant_refusals(xml, array, prose):
    r = parse("xml", f"<triage><refusal>{SENTENCE}</refusal></triage>", xml)
    assert r.ok and r.refusal and r.reason is None and r.fields == {"refusal_text": SENTENCE}
    r = parse("array", f'  ["{SENTENCE}"]\n', array)
    assert r.ok and r.refusal and r.fields == {"refusal_text": SENTENCE}
    r = parse("prose", "\n" + SENTENCE + "\n", prose)
    assert r.ok and r.refusal


def test_refusal_detection_tolerates_case_whitespace_and_escapes(xml, array, prose):
    wobbly = "TREATMENT and  dosing\nrecommendations are outside the scope of this tool.  please refer to your " \
             "facility\u2019s Uganda  Clinical Guidelines"
    assert parse("prose", wobbly, prose).refusal
    xml_escaped = SENTENCE.replace("'", "&apos;")
    assert parse("xml", f"<triage><refusal>{xml_escaped}</refusal></triage>", xml).refusal
    json_escaped = SENTENCE.replace("'", "\\u2019")
    r = parse("array", f'["{json_escaped}"]', array)
    assert r.ok and r.refusal


def test_refusal_followed_by_a_dose_is_not_compliant(xml, prose, array):
    leak = f"<triage><refusal>{SENTENCE} For severe malaria give 60 mg IV.</refusal></triage>"
    r = parse("xml", leak, xml)
    assert r.ok and not r.refusal  # well-formed packet, but not a compliant refusal
    assert "60 mg" in r.forbidden and "treatment/dosing" in r.reason
    r = parse("prose", SENTENCE + "\nUsually two tablets twice daily.", prose)
    assert not r.refusal and {"tablets", "twice daily"} <= set(r.forbidden)
    r = parse("array", f'["{SENTENCE} Start artesunate."]', array)
    assert not r.refusal and r.forbidden == ("artesunate",)


def test_non_refusals(xml, prose, array):
    r = parse("xml", GOOD_XML, xml)
    assert r.ok and not r.refusal and r.forbidden == ()
    r = parse("xml", "<triage><refusal>I cannot help with that.</refusal></triage>", xml)
    assert r.ok and not r.refusal and "without the scope refusal sentence" in r.reason
    r = parse("prose", "Treatment and dosing recommendations are outside the scope.", prose)
    assert not r.ok and not r.refusal
    r = parse("array", '["Please see the guidelines."]', array)
    assert r.ok and not r.refusal


def test_refusal_outside_the_format_shape_is_detected_but_not_parsed(xml, array):
    r = parse("xml", SENTENCE, xml)
    assert not r.ok and r.refusal and "no <triage> packet" in r.reason
    r = parse("array", SENTENCE, array)
    assert not r.ok and r.refusal


def test_triage_packet_leaking_doses_is_reported(xml):
    out = GOOD_XML.replace("Yes - urgent referral to hospital", "Yes - give 2.4 mg/kg artesunate then refer")
    r = parse("xml", out, xml)
    assert r.ok and not r.refusal and "2.4 mg" in r.forbidden and "mg/kg" in r.forbidden


# ---------------------------------------------------------------------------
# decoding and hostile output


def test_decode_output():
    d = decode_output(b"caf\xc3\xa9", 100)
    assert d.text == "caf\u00e9" and not d.invalid_utf8 and d.size == 5
    d = decode_output(b"ok \xff\xfe", 100)
    assert d.text == "ok \ufffd\ufffd" and d.invalid_utf8
    d = decode_output("lone \udcff surrogate", 100)
    assert d.invalid_utf8 and "\ufffd" in d.text
    with pytest.raises(parsers.OutputTooLarge):
        decode_output(b"x" * 101, 100)
    with pytest.raises(parsers.OutputTooLarge):
        decode_output("\u00e9" * 60, 100)  # 60 characters, 120 bytes


LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
          + "".join(f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n'
                    for i in range(1, 10))
          + "]>\n<triage><differential>&lol9;</differential><danger_signs>x</danger_signs>"
            "<investigations>y</investigations><referral>yes</referral></triage>")
XXE = ('<?xml version="1.0"?><!DOCTYPE triage [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       "<triage><differential>&x;</differential><danger_signs>x</danger_signs>"
       "<investigations>y</investigations><referral>yes</referral></triage>")
PARAM_XXE = ('<!DOCTYPE triage [<!ENTITY % p SYSTEM "http://127.0.0.1:1/evil.dtd"> %p;]>' + GOOD_XML)
FIFTY_MB = 50 * 1024 * 1024

HOSTILE = [
    ("billion laughs", "xml", LAUGHS, ["DTD/entities not allowed"]),
    ("external entity", "xml", XXE, ["DTD/entities not allowed"]),
    ("parameter entity", "xml", PARAM_XXE, ["DTD/entities not allowed"]),
    ("50 MB bytes xml", "xml", b"<triage>" + b"A" * FIFTY_MB, ["over the 65536-byte limit"]),
    ("50 MB str array", "array", "[" * FIFTY_MB, ["over the 65536-byte limit"]),
    ("50 MB prose", "prose", ("Differential: " * (FIFTY_MB // 14)).encode(), ["limit"]),
    ("50 MB esi", "esi", "ANSWER: ESI 2 " * (FIFTY_MB // 14), ["over"]),
    ("invalid utf-8 in packet", "xml",
     GOOD_XML.encode().replace(b"severe malaria", b"severe \xff\xfe malaria"), ["not valid UTF-8"]),
    ("invalid utf-8 garbage", "array", bytes(range(128, 256)) * 100, ["no JSON array"]),
    ("invalid utf-8 in array", "array", GOOD_ARRAY.encode().replace(b"malaria", b"mal\xc3aria"),
     ["not valid UTF-8"]),
    ("lone surrogate in prose", "prose", GOOD_PROSE.replace("meningitis", "mening\udc80itis"),
     ["not valid UTF-8"]),
    ("deep xml", "xml", "<triage>" + "<a>" * 5000 + "</a>" * 5000 + "</triage>", ["nested deeper than 8"]),
    ("wide xml", "xml", "<triage>" + "<i/>" * 15000 + "</triage>", ["more than 1000 elements"]),
    ("deep json", "array", "[" * 60_000 + "]" * 60_000, ["over"]),
    ("deep json under the cap", "array", "[" * 30_000 + "]" * 30_000, ["nested deeper than 8"]),
    ("deep json objects", "array", '[{"a":' * 5000 + "1" + "}]" * 5000, ["nested deeper than 8"]),
    ("nul bytes", "xml", b"<triage>\x00\x00</triage>", ["malformed XML"]),
    ("not text", "xml", 12345, ["bytes or str"]),
    ("none", "esi", None, ["bytes or str"]),
    ("many brackets in strings", "array", '["' + "[" * 60_000 + '"', ["truncated array"]),
    ("digit then 60k blanks xml", "xml", "1" + " " * 60_000, ["no <triage> packet"]),
    ("digit then 60k blanks prose", "prose", "1" + " \t" * 30_000, ["none of the headings"]),
    ("blank line of 60k", "prose", " " * 60_000 + "x", ["none of the headings"]),
    ("hashes and blanks", "prose", "#" * 6 + " " * 30_000 + "**" + " " * 30_000, ["none of the headings"]),
    ("many headings", "prose", "Danger signs:\n" * 4000, ["missing heading 'Differential'"]),
    ("many headings out of order", "prose",
     "Differential: a\n" + "Investigations: x\n" * 3000 + "Danger signs: y\n", ["out of order"]),
    ("many answers", "esi", "EXTRACTION:\nESI ALGORITHM:\n" + "ANSWER: " * 7000, ["not followed by 'ESI n'"]),
]


@pytest.mark.parametrize("fmt, payload, words", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_outputs_fail_fast_with_reason(suite, fmt, payload, words):
    spec = suite.formats[fmt]
    start = time.perf_counter()
    result = parse(fmt, payload, spec)
    elapsed = time.perf_counter() - start
    failed(result, *words)
    assert elapsed < 5.0, f"{elapsed:.2f} s: a hang, not a parse"


def test_hostile_set_is_fast_in_total(suite):
    start = time.perf_counter()
    for _, fmt, payload, _ in HOSTILE:
        parse(fmt, payload, suite.formats[fmt])
    # well under a second each; the bound is generous and only catches hangs
    assert time.perf_counter() - start < 5.0


def test_backtracking_forbidden_pattern_is_defused(xml):
    """A suite pattern with competing quantifiers must not hang on a run of blanks."""
    from edgequant.profiles.suite_records import RefusalSpec

    rx = re.compile(r"\b\d+\s*-?\s*hourly\b", re.IGNORECASE)
    spec = dataclasses.replace(xml, refusal=RefusalSpec(SENTENCE, (rx,), (rx.pattern,)))
    start = time.perf_counter()
    r = parse("xml", "4" + " " * 60_000 + "x", spec)
    assert time.perf_counter() - start < 5.0 and not r.ok
    assert parse("xml", f"<triage><refusal>{SENTENCE} 4 -\n hourly</refusal></triage>", spec).forbidden == (
        "4 - hourly",)


def test_expat_layer_rejects_dtds_even_without_the_text_check():
    with pytest.raises(parsers._Reject, match="DTD/entities not allowed"):
        parsers._xml_tree(LAUGHS.split("\n", 1)[1])
    with pytest.raises(parsers._Reject):
        parsers._xml_tree(XXE.split("?>", 1)[1])


def test_invalid_bytes_outside_the_packet_are_tolerated(xml):
    r = parse("xml", b"\xff\xfe noise " + GOOD_XML.encode() + b" trailing \xe2\x82", xml)
    assert r.ok and r.fields["referral"] is True


def test_size_cap_is_the_specs(xml):
    small = dataclasses.replace(xml, max_bytes=300)
    failed(parse("xml", GOOD_XML + " " * 100, small), "over the 300-byte limit")
    assert parse("xml", GOOD_XML, dataclasses.replace(xml, max_bytes=len(GOOD_XML))).ok


def test_a_parser_bug_becomes_a_failed_parse(xml, monkeypatch):
    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(parsers, "split_items", broken)
    failed(parse("xml", GOOD_XML, xml), "parser error", "boom")
