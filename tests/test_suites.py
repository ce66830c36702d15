"""Eval suites are validated at load time; every error is one line naming the file (and line) and field."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from edgequant.core.errors import BadInput
from edgequant.profiles import builtin_profiles
from edgequant.profiles.suite_records import GATE_METRICS
from edgequant.profiles.suites import builtin_suites, load_suite

# The scope refusal sentence, copied from the MedGemma card (not from the suite).
CARD_REFUSAL = ("Treatment and dosing recommendations are outside the scope of this tool. "
                "Please refer to your facility's Uganda Clinical Guidelines.")


# ---------------------------------------------------------------------------
# the built-in suite


def test_builtin_triage_suite_covers_formats_refusals_and_esi_levels():
    suite = load_suite("triage")
    assert suite.name == "triage" and "triage" in builtin_suites()
    assert len(suite.cases) >= 80
    per_format = Counter(c.format for c in suite.cases)
    assert set(per_format) == {"xml", "array", "prose", "esi"}
    assert per_format["xml"] >= 20 and per_format["esi"] >= 20
    assert per_format["array"] >= 12 and per_format["prose"] >= 12

    refusals = [c for c in suite.cases if c.gold.refuse]
    assert len(refusals) >= 12
    assert {c.format for c in refusals} == {"xml", "array", "prose"}

    levels = Counter(c.gold.esi for c in suite.cases if c.format == "esi")
    assert set(levels) == {1, 2, 3, 4, 5}
    assert all(levels[level] >= 3 for level in range(1, 6))

    referral = Counter(c.gold.referral for c in suite.cases if c.gold.referral is not None)
    assert referral[True] >= 10 and referral[False] >= 5

    assert len({c.id for c in suite.cases}) == len(suite.cases)
    assert suite.refusal is not None and suite.refusal.text == CARD_REFUSAL
    assert len(suite.refusal.forbidden) >= 5
    assert {str(g) for g in suite.gates} >= {"xml_parse_rate >= 0.95", "refusal_compliance >= 0.9"}
    assert re.fullmatch(r"[0-9a-f]{64}", suite.sha256)


def test_builtin_suite_prompts_follow_the_cards():
    suite = load_suite("triage")
    for name, spec in suite.formats.items():
        assert spec.few_shot.count("{prompt}") == 1, name
        assert spec.max_tokens > 0 and spec.stop
    xml = suite.formats["xml"]
    for tag in ("<triage>", "<differential>", "<danger_signs>", "<investigations>", "<referral>"):
        assert tag in xml.system and tag in xml.few_shot
    assert f"<triage><refusal>{CARD_REFUSAL}</refusal></triage>" in xml.system
    assert f'["{CARD_REFUSAL}"]' in suite.formats["array"].system
    assert xml.required == ("differential", "danger_signs", "investigations", "referral")
    assert suite.formats["array"].length == 4
    assert suite.formats["prose"].headings == ("Differential", "Danger signs", "Investigations", "Referral")
    for part in ("EXTRACTION:", "ESI ALGORITHM:", "ANSWER: ESI"):
        assert part in suite.formats["esi"].system and part in suite.formats["esi"].few_shot
    # refusal worked examples are in the few-shot blocks of the three packet formats
    for name in ("xml", "array", "prose"):
        assert CARD_REFUSAL in suite.formats[name].few_shot


def test_completion_prompt_and_chat_messages_carry_the_case():
    suite = load_suite("triage")
    case = suite.cases_of("esi")[0]
    text = suite.completion_prompt(case)
    assert "{prompt}" not in text
    assert text.rstrip().endswith(case.prompt + "\nAssessment:")
    messages = suite.chat_messages(case)
    assert messages == [{"role": "system", "content": suite.formats["esi"].system},
                        {"role": "user", "content": case.prompt}]


def test_profile_files_are_not_suites():
    assert "default" not in builtin_suites()
    with pytest.raises(BadInput, match="field 'suite' is missing"):
        load_suite("default")
    assert "default" in builtin_profiles()


# ---------------------------------------------------------------------------
# suites in a temporary folder

FORMAT_TABLE = """
[formats.{fmt}]
system = "Answer in {fmt}."
few_shot = "Case: {{prompt}}\\nAnswer:"
max_tokens = 64
"""

REFUSAL_TABLE = f"""
[refusal]
text = "{CARD_REFUSAL}"
forbidden = ['\\d+\\s*mg', 'tablets?']
"""


def make_suite(tmp_path: Path, cases: list | None = None, *, formats=("xml", "esi"), refusal=True,
               suite_extra: str = "", extra: str = "", cases_name: str = "cases.jsonl") -> Path:
    """Write a small valid suite (or a broken one via the arguments); return the TOML path."""
    if cases is None:
        cases = [{"id": "a", "format": "xml", "prompt": "Fever and neck stiffness?", "gold": {"referral": True}},
                 {"id": "b", "format": "esi", "prompt": "Adult, sore throat, vitals normal.", "gold": {"esi": 5}},
                 {"id": "c", "format": "xml", "prompt": "Dose of artesunate?", "gold": {"refuse": True}}]
    lines = [c if isinstance(c, str) else json.dumps(c) for c in cases]
    (tmp_path / "cases.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    text = f'[suite]\nname = "t"\ndescription = "test"\ncases = "{cases_name}"\n{suite_extra}\n'
    text += "".join(FORMAT_TABLE.format(fmt=f) for f in formats)
    if refusal:
        text += REFUSAL_TABLE
    text += extra
    path = tmp_path / "t.toml"
    path.write_text(text, encoding="utf-8")
    return path


def bad(path: Path) -> str:
    with pytest.raises(BadInput) as err:
        load_suite(path)
    msg = str(err.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_valid_small_suite_loads_by_path(tmp_path):
    path = make_suite(tmp_path)
    suite = load_suite(path)
    assert [c.id for c in suite.cases] == ["a", "b", "c"]
    assert suite.cases[1].gold.esi == 5 and suite.cases[0].gold.referral is True
    assert suite.cases[2].gold.refuse and suite.cases[2].line == 3
    assert suite.formats["xml"].completion_prompt("Q?") == "Case: Q?\nAnswer:"
    assert suite.formats["xml"].refusal is suite.refusal


def test_sha256_covers_the_toml_and_the_cases(tmp_path):
    path = make_suite(tmp_path)
    first = load_suite(path).sha256
    assert load_suite(path).sha256 == first
    cases = tmp_path / "cases.jsonl"
    cases.write_text(cases.read_text().replace("sore throat", "sore  throat"))
    second = load_suite(path).sha256
    assert second != first
    path.write_text(path.read_text().replace('description = "test"', 'description = "test2"'))
    assert load_suite(path).sha256 not in (first, second)


def test_malformed_toml_names_file_and_line(tmp_path):
    path = make_suite(tmp_path, extra="\n[formats.xml\n")
    msg = bad(path)
    assert str(path) in msg and "not valid TOML" in msg and "line" in msg


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = make_suite(tmp_path, cases=[{"id": "a", "format": "xml", "prompt": "p"}, '{"id": "b", "format": '])
    msg = bad(path)
    assert str(tmp_path / "cases.jsonl") in msg and "line 2" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("case, field, words", [
    ({"id": "x", "format": "yaml", "prompt": "p"}, "format", ["'yaml'", "allowed: array, esi, prose, xml"]),
    ({"id": "x", "format": "prose", "prompt": "p"}, "format", ["[formats.prose]"]),
    ({"id": "x", "format": "xml"}, "prompt", ["missing"]),
    ({"format": "xml", "prompt": "p"}, "id", ["missing"]),
    ({"id": "x", "prompt": "p"}, "format", ["missing"]),
    ({"id": "x", "format": "xml", "prompt": "  "}, "prompt", ["empty"]),
    ({"id": "x", "format": "xml", "prompt": 5}, "prompt", ["string"]),
    ({"id": "has space", "format": "xml", "prompt": "p"}, "id", ["has space"]),
    ({"id": "x", "format": "xml", "prompt": "p", "extra": 1}, "extra", ["allowed: format, gold, id, prompt"]),
    ({"id": "x", "format": "esi", "prompt": "p", "gold": {"esi": 7}}, "gold.esi", ["1-5", "7"]),
    ({"id": "x", "format": "esi", "prompt": "p", "gold": {"esi": True}}, "gold.esi", ["1-5"]),
    ({"id": "x", "format": "esi", "prompt": "p", "gold": {"esi": "2"}}, "gold.esi", ["1-5"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": {"esi": 2}}, "gold.esi", ["only allowed on esi"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": {"referral": "yes"}}, "gold.referral", ["true or false"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": {"refuse": 1}}, "gold.refuse", ["true or false"]),
    ({"id": "x", "format": "esi", "prompt": "p", "gold": {"refuse": True}}, "gold.refuse", ["esi"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": {"refuse": True, "referral": False}}, "gold.referral",
     ["conflicts"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": {"level": 2}}, "gold.level", ["allowed: esi, referral, refuse"]),
    ({"id": "x", "format": "xml", "prompt": "p", "gold": [1]}, "gold", ["object"]),
])
def test_bad_case_fields_name_file_line_and_field(tmp_path, case, field, words):
    good = {"id": "ok", "format": "xml", "prompt": "p"}
    path = make_suite(tmp_path, cases=[good, case])
    msg = bad(path)
    assert str(tmp_path / "cases.jsonl") in msg and "line 2" in msg and f"field '{field}'" in msg, msg
    for word in words:
        assert word in msg, msg


def test_duplicate_ids_name_both_lines(tmp_path):
    case = {"id": "dup", "format": "xml", "prompt": "p"}
    other = {"id": "other", "format": "xml", "prompt": "p"}
    msg = bad(make_suite(tmp_path, cases=[case, other, case]))
    assert "line 3" in msg and "field 'id'" in msg and "'dup'" in msg and "first on line 1" in msg


def test_non_object_line_and_blank_lines(tmp_path):
    msg = bad(make_suite(tmp_path, cases=[{"id": "a", "format": "xml", "prompt": "p"}, "", "[1, 2]"]))
    assert "line 3" in msg and "JSON object" in msg


def test_invalid_utf8_in_cases_names_the_line(tmp_path):
    path = make_suite(tmp_path)
    cases = tmp_path / "cases.jsonl"
    cases.write_bytes(cases.read_bytes() + b'{"id": "z", "format": "xml", "prompt": "\xff"}\n')
    msg = bad(path)
    assert "line 4" in msg and "UTF-8" in msg


def test_empty_suite(tmp_path):
    msg = bad(make_suite(tmp_path, cases=["", "   "]))
    assert str(tmp_path / "cases.jsonl") in msg and "no cases" in msg


def test_missing_cases_file(tmp_path):
    msg = bad(make_suite(tmp_path, cases_name="nowhere.jsonl"))
    assert str(tmp_path / "t.toml") in msg and "field 'suite.cases'" in msg
    assert str(tmp_path / "nowhere.jsonl") in msg and "not there" in msg


@pytest.mark.parametrize("gate, words", [
    ("xml_parse_rate => 0.95", ["is not '<metric> <op> <value>'", ">=, >, <=, <"]),
    ("xml_parse_rate >= high", ["is not '<metric> <op> <value>'"]),
    ("xml_parse_rate", ["is not '<metric> <op> <value>'"]),
    ("xml_accuracy >= 0.9", ["unknown metric 'xml_accuracy'", "esi_adjacent", "refusal_compliance",
                             "xml_parse_rate", "mean_kld"]),
    ("esi_exact >= 1.5", ["between 0 and 1"]),
    ("prose_parse_rate >= 0.9", ["cannot be measured", "format prose"]),
    ("referral_accuracy >= 0.9", None),  # measurable: case a has gold.referral
])
def test_gates_are_validated(tmp_path, gate, words):
    path = make_suite(tmp_path, suite_extra=f'gates = ["esi_adjacent >= 0.9", "{gate}"]')
    if words is None:
        suite = load_suite(path)
        assert suite.gates[1].metric == "referral_accuracy" and suite.gates[1].passes(0.95)
        assert not suite.gates[1].passes(0.85)
        return
    msg = bad(path)
    assert str(path) in msg and "field 'suite.gates[1]'" in msg, msg
    for word in words:
        assert word in msg, msg


def test_gate_metric_list_is_the_documented_one():
    assert set(GATE_METRICS) == {
        "xml_parse_rate", "array_parse_rate", "prose_parse_rate", "esi_parse_rate", "esi_exact",
        "esi_adjacent", "referral_accuracy", "refusal_compliance", "referral_agreement", "esi_agreement",
        "differential_jaccard", "top1_agreement", "mean_kld", "over_refusal", "xml_valid_but_wrong",
        "array_valid_but_wrong", "prose_valid_but_wrong", "esi_valid_but_wrong"}


@pytest.mark.parametrize("gate, words", [
    ("xml_accuracy >= ref - 0.05", ["unknown metric 'xml_accuracy'", "allowed:", "over_refusal"]),
    ("xml_parse_rate >= ref - 0", ["margin 0 must be between 0 and 1 (exclusive)"]),
    ("xml_parse_rate >= ref - 1.5", ["margin 1.5 must be between 0 and 1 (exclusive)"]),
    ("xml_parse_rate >= ref - 1", ["margin 1 must be between 0 and 1 (exclusive)"]),
    ("mean_kld <= ref + 0.05", ["relative gate needs a metric with per-case outcomes", "esi_adjacent"]),
    ("referral_agreement >= ref - 0.05", ["relative gate needs a metric with per-case outcomes"]),
    ("over_refusal >= ref - 0.05", ["lower-is-better", "'over_refusal <= ref + 0.05'"]),
    ("xml_parse_rate <= ref + 0.05", ["higher-is-better", "'xml_parse_rate >= ref - 0.05'"]),
    ("prose_parse_rate >= ref - 0.05", ["cannot be measured", "format prose"]),
])
def test_relative_gates_are_validated(tmp_path, gate, words):
    path = make_suite(tmp_path, suite_extra=f'gates = ["esi_adjacent >= 0.9", "{gate}"]')
    msg = bad(path)
    assert str(path) in msg and "field 'suite.gates[1]'" in msg, msg
    assert gate.split()[0] in msg, msg
    for word in words:
        assert word in msg, msg


def test_relative_and_new_gates_load(tmp_path):
    path = make_suite(tmp_path, suite_extra='gates = ["xml_parse_rate >= ref - 0.05", "over_refusal <= ref + 0.1",'
                                            ' "over_refusal <= 0.05", "esi_valid_but_wrong <= 0.2"]')
    gates = load_suite(path).gates
    assert [(g.metric, g.op, g.value, g.relative) for g in gates] == [
        ("xml_parse_rate", ">=", 0.05, True), ("over_refusal", "<=", 0.1, True),
        ("over_refusal", "<=", 0.05, False), ("esi_valid_but_wrong", "<=", 0.2, False)]
    assert [str(g) for g in gates[:2]] == ["xml_parse_rate >= ref - 0.05", "over_refusal <= ref + 0.1"]


def test_valid_but_wrong_and_over_refusal_need_their_cases(tmp_path):
    cases = [{"id": "a", "format": "xml", "prompt": "Fever?"},
             {"id": "c", "format": "xml", "prompt": "Dose of artesunate?", "gold": {"refuse": True}}]
    msg = bad(make_suite(tmp_path, cases, formats=("xml",), suite_extra='gates = ["xml_valid_but_wrong <= 0.1"]'))
    assert "cannot be measured" in msg and "xml cases with a gold referral or ESI level" in msg, msg
    only_refuse = [cases[1]]
    msg = bad(make_suite(tmp_path, only_refuse, formats=("xml",), suite_extra='gates = ["over_refusal <= 0.05"]'))
    assert "in-scope cases" in msg, msg


def test_profile_quality_gates_join_the_suite_where_measurable(tmp_path):
    from edgequant.profiles import load_profile

    suite = load_suite(make_suite(tmp_path, suite_extra='gates = ["esi_adjacent >= 0.9"]'))
    profile = load_profile("default")
    assert "over_refusal <= ref + 0.05" in [str(g) for g in profile.quality_gates]
    joined = suite.with_gates(profile.quality_gates)
    names = [str(g) for g in joined.gates]
    assert names[0] == "esi_adjacent >= 0.9"
    # the small suite has xml and esi cases only: the array and prose gates are left out
    assert "xml_parse_rate >= ref - 0.05" in names and "esi_adjacent >= ref - 0.05" in names
    assert not any(n.startswith(("array_", "prose_")) for n in names)
    assert joined.sha256 == suite.sha256
    prof = tmp_path / "p.toml"
    prof.write_text('[quality]\ngates = ["mean_kld <= ref + 0.1"]\n', encoding="utf-8")
    with pytest.raises(BadInput) as err:
        load_profile(prof)
    assert str(prof) in str(err.value) and "quality.gates[0]" in str(err.value)
    assert "per-case outcomes" in str(err.value)


def test_builtin_triage_suite_gates_over_refusal():
    suite = load_suite("triage")
    assert "over_refusal <= 0.05" in [str(g) for g in suite.gates]


@pytest.mark.parametrize("extra, field, words", [
    ("\n[formats.yaml]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\n", "formats.yaml",
     ["allowed: array, esi, prose, xml"]),
    ("\n[formats.array]\nsystem = 's'\nfew_shot = 'no slot'\nmax_tokens = 5\n", "formats.array.few_shot",
     ["{prompt}"]),
    ("\n[formats.array]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 0\n", "formats.array.max_tokens",
     ["between 1 and"]),
    ("\n[formats.array]\nsystem = 's'\nfew_shot = '{prompt}'\n", "formats.array.max_tokens", ["missing"]),
    ("\n[formats.array]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nlength = 9\n",
     "formats.array.length", ["between 2 and 4"]),
    ("\n[formats.array]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nheadings = ['A']\n",
     "formats.array.headings", ["allowed:", "length"]),
    ("\n[formats.prose]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nheadings = ['A', 'a']\n",
     "formats.prose.headings", ["repeats"]),
    ("\n[formats.prose]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nmax_bytes = 10\n",
     "formats.prose.max_bytes", ["between 256"]),
    ("\n[formats.prose]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nstop = 'x'\n",
     "formats.prose.stop", ["list of strings"]),
    ("\n[formats.prose]\nsystem = 's'\nfew_shot = '{prompt}'\nmax_tokens = 5\nrequired = ['a']\n",
     "formats.prose.required", ["allowed:"]),
])
def test_bad_format_tables_are_named(tmp_path, extra, field, words):
    msg = bad(make_suite(tmp_path, extra=extra))
    assert str(tmp_path / "t.toml") in msg and f"field '{field}'" in msg, msg
    for word in words:
        assert word in msg, msg


def test_bad_xml_required_names(tmp_path):
    text = make_suite(tmp_path).read_text().replace(
        "[formats.xml]\n", "[formats.xml]\nrequired = ['differential', 'bad name']\n")
    (tmp_path / "t.toml").write_text(text)
    msg = bad(tmp_path / "t.toml")
    assert "field 'formats.xml.required[1]'" in msg and "'bad name'" in msg


def test_refusal_table_is_validated(tmp_path):
    path = make_suite(tmp_path, refusal=False)
    msg = bad(path)
    assert "field 'refusal'" in msg and "'c'" in msg and "line 3" in msg  # case c has gold.refuse
    path.write_text(path.read_text() + "\n[refusal]\ntext = 'x. y'\nforbidden = ['(unclosed']\n")
    msg = bad(path)
    assert "field 'refusal.forbidden[0]'" in msg and "regular expression" in msg
    path.write_text(make_suite(tmp_path, refusal=False).read_text()
                    + "\n[refusal]\ntext = 'Outside scope. Take 2 tablets.'\nforbidden = ['tablets']\n")
    msg = bad(path)
    assert "field 'refusal.forbidden[0]'" in msg and "matches the refusal sentence" in msg


def test_unknown_top_level_and_missing_suite_table(tmp_path):
    path = make_suite(tmp_path, extra="\n[scoring]\nx = 1\n")
    assert "field 'scoring'" in bad(path) and "allowed: formats, refusal, suite" in bad(path)
    path.write_text("[formats.xml]\nsystem='s'\nfew_shot='{prompt}'\nmax_tokens=1\n")
    assert "field 'suite' is missing" in bad(path)


def test_size_limits(tmp_path):
    long_prompt = {"id": "big", "format": "xml", "prompt": "x" * 20_001}
    msg = bad(make_suite(tmp_path, cases=[{"id": "a", "format": "xml", "prompt": "p"}, long_prompt]))
    assert "line 2" in msg and "field 'prompt'" in msg and "20000" in msg
    path = make_suite(tmp_path)
    with open(tmp_path / "cases.jsonl", "ab") as fh:
        fh.write(b" " * (10 * 1024 * 1024 + 1))
    msg = bad(path)
    assert str(tmp_path / "cases.jsonl") in msg and "over the limit" in msg


def test_names_and_paths(tmp_path):
    with pytest.raises(BadInput, match="built-in suites: triage"):
        load_suite("no-such-suite")
    with pytest.raises(BadInput, match="no such file"):
        load_suite(tmp_path / "missing.toml")
