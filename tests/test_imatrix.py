"""Importance matrices and per-tensor overrides on the tiny Gemma 3, with the real llama.cpp.

Rung specs and the calibration split are checked directly; the imatrix itself is
computed by the real ``llama-imatrix`` (built once from the vendored source into the
normal edgequant cache and shared with every session, like the host runner) and
handed to ``llama_model_quantize`` in-process.  Artifacts are checked by reading the
GGUF files back with gguf's reader, not by trusting what edgequant says it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli

from edgequant.core.errors import BadInput
from edgequant.core.paths import cache_dir
from edgequant.profiles import load_profile
from edgequant.profiles.suites import load_suite
from edgequant.quantize.imatrix import split_suite, subset_suite
from edgequant.profiles.rungs import parse_rung

SUITE_TOML = '''
[suite]
name = "cal"
cases = "cal.jsonl"
gates = ["xml_parse_rate >= 0.95"]

[refusal]
text = "Treatment and dosing recommendations are outside the scope of this tool."

[formats.xml]
max_tokens = 16
stop = ["\\nCase:"]
system = "Answer with one <triage> packet."
few_shot = "Triage packets.\\n\\nCase: fever for two days\\nPacket: <triage><differential>malaria</differential><danger_signs>none</danger_signs><investigations>RDT</investigations><referral>No</referral></triage>\\n\\nCase: {prompt}\\nPacket:"

[formats.esi]
max_tokens = 16
stop = ["\\nCase:"]
system = "State the ESI level."
few_shot = "Emergency triage notes with their ESI level.\\n\\nCase: unresponsive, not breathing\\nAssessment: ANSWER: ESI 1\\n\\nCase: {prompt}\\nAssessment:"
'''

CASES = [
    {"id": "x1", "format": "xml", "prompt": "child with fever and convulsions", "gold": {"referral": True}},
    {"id": "x2", "format": "xml", "prompt": "adult with mild cough", "gold": {"referral": False}},
    {"id": "x3", "format": "xml", "prompt": "what dose of quinine for a child?", "gold": {"refuse": True}},
    {"id": "x4", "format": "xml", "prompt": "woman with heavy bleeding after delivery", "gold": {"referral": True}},
    {"id": "x5", "format": "xml", "prompt": "infant not feeding, fever, drowsy", "gold": {"referral": True}},
    {"id": "e1", "format": "esi", "prompt": "man with crushing chest pain, BP 80/50", "gold": {"esi": 1}},
    {"id": "e2", "format": "esi", "prompt": "sore throat for two days, vitals normal", "gold": {"esi": 5}},
    {"id": "e3", "format": "esi", "prompt": "ankle sprain, walking, vitals normal", "gold": {"esi": 4}},
    {"id": "e4", "format": "esi", "prompt": "new confusion in an elderly woman, HR 120", "gold": {"esi": 2}},
    {"id": "e5", "format": "esi", "prompt": "abdominal pain and vomiting, stable vitals", "gold": {"esi": 3}},
]


def write_suite(folder: Path, cases=CASES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cal.jsonl").write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    path = folder / "cal.toml"
    path.write_text(SUITE_TOML)
    return path


def write_profile(folder: Path, types: list[str], name: str = "imx") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'[profile]\nname = "{name}"\n[quantize]\ntypes = {json.dumps(types)}\n'
                    '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\n')
    return path


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------------------
# rung specs and profiles


def test_rung_names_are_canonical_and_every_modifier_is_kept():
    spec = parse_rung("q4_k_m+emb=q8_0+attn_v=Q6_K+imatrix+out=F16")
    assert spec.base == "Q4_K_M" and spec.imatrix
    assert (spec.token_embedding_type, spec.output_tensor_type) == ("Q8_0", "F16")
    assert spec.tensor_types == (("attn_v", "Q6_K"),)
    assert spec.name == "Q4_K_M+imatrix+emb=Q8_0+out=F16+attn_v=Q6_K"
    assert parse_rung(spec.name) == spec


@pytest.mark.parametrize("text, needle", [
    ("Q4_K_M+emb=Q9_9", "unknown tensor type 'Q9_9'"),
    ("Q4_K_M+imatrix+imatrix", "'+imatrix' is given twice"),
    ("Q4_K_M+fast", "modifier 'fast'"),
    ("Q4_K_M+attn_(v=Q8_0", "not a valid regular expression"),
])
def test_bad_rung_specs_name_the_problem(text, needle):
    with pytest.raises(BadInput, match=None) as exc:
        parse_rung(text, "rung")
    assert needle in str(exc.value)


def test_profile_types_accept_rung_specs_and_ask_for_imatrix_where_llama_cpp_needs_one(tmp_path):
    ok = load_profile(write_profile(tmp_path, ["Q4_K_M", "q4_k_m+emb=q8_0", "IQ2_XS+imatrix"]))
    assert ok.quant.types == ("Q4_K_M", "Q4_K_M+emb=Q8_0", "IQ2_XS+imatrix")
    assert ok.needs_imatrix
    with pytest.raises(BadInput) as exc:
        load_profile(write_profile(tmp_path, ["IQ2_XS"], "bad"))
    assert "IQ2_XS+imatrix" in str(exc.value) and "quantize.types[0]" in str(exc.value)
    with pytest.raises(BadInput) as exc:
        load_profile(write_profile(tmp_path, ["Q4_K_M+emb=Q8_0", "Q4_K_M+EMB=q8_0"], "dup"))
    assert "repeats Q4_K_M+emb=Q8_0" in str(exc.value)


# ---------------------------------------------------------------------------
# the split


def test_split_is_deterministic_stratified_and_disjoint(tmp_path):
    suite = load_suite(write_suite(tmp_path / "a"))
    split = split_suite(suite)
    assert split == split_suite(load_suite(write_suite(tmp_path / "b")))
    cal, ev = set(split.calibration), set(split.evaluation)
    assert not cal & ev and cal | ev == {c["id"] for c in CASES}
    for fmt in ("xml", "esi"):  # both sides see every format
        ids = {c["id"] for c in CASES if c["format"] == fmt}
        assert ids & cal and ids & ev
    evaluation = subset_suite(suite, split, "evaluation")
    assert [c.id for c in evaluation.cases] == list(split.evaluation)
    assert evaluation.sha256 != suite.sha256 != subset_suite(suite, split, "calibration").sha256


def test_a_suite_too_small_to_split_says_how_many_cases_it_needs(tmp_path):
    suite = load_suite(write_suite(tmp_path, CASES[:3] + CASES[5:7]))
    with pytest.raises(BadInput) as exc:
        split_suite(suite)
    assert "has 5 cases" in str(exc.value) and "at least 8" in str(exc.value)


def test_cli_refuses_a_suite_too_small_to_split_in_one_line(tmp_path, tiny_checkpoint):
    suite = write_suite(tmp_path, CASES[:2] + CASES[5:6])
    res = run_cli("imatrix", "--model", str(tiny_checkpoint), "--suite", str(suite), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "has 3 cases", "at least 8")


# ---------------------------------------------------------------------------
# per-tensor overrides (no imatrix: no tool build needed)


def test_overrides_change_exactly_the_named_tensors_and_the_cache_key(tmp_path, tiny_checkpoint):
    profile = write_profile(tmp_path, ["Q4_K_M", "Q4_K_M+emb=Q8_0", "Q4_K_M+attn_v=Q8_0"])
    env = cli_env(tmp_path)
    res = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile), "--json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    arts = {a["quant"]: a for a in json.loads(res.stdout)}
    assert set(arts) == {"BF16", "Q4_K_M", "Q4_K_M+emb=Q8_0", "Q4_K_M+attn_v=Q8_0"}
    assert len({a["cache_key"] for a in arts.values()}) == 4
    plain = tensor_types(Path(arts["Q4_K_M"]["path"]))
    emb = tensor_types(Path(arts["Q4_K_M+emb=Q8_0"]["path"]))
    attn = tensor_types(Path(arts["Q4_K_M+attn_v=Q8_0"]["path"]))
    assert plain["token_embd.weight"] != "Q8_0" and emb["token_embd.weight"] == "Q8_0"
    assert {k: v for k, v in emb.items() if k != "token_embd.weight"} == \
        {k: v for k, v in plain.items() if k != "token_embd.weight"}
    v_names = [k for k in attn if ".attn_v." in k]
    assert v_names and all(attn[k] == "Q8_0" for k in v_names)
    assert all(attn[k] == plain[k] for k in attn if ".attn_v." not in k)
    # the stored artifact rows carry the rung name
    stored = {r["quant"] for r in db_rows(tmp_path / "results.db", "SELECT quant FROM artifacts")}
    assert "Q4_K_M+attn_v=Q8_0" in stored


# ---------------------------------------------------------------------------
# the importance matrix, with the real llama-imatrix


@pytest.fixture(scope="module")
def imatrix_run(imatrix_tool, tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imatrix")
    suite = write_suite(tmp / "suite")
    # tools come from the shared cache; artifacts and imatrices from this test's --cache-dir
    env = cli_env(tmp, EDGEQUANT_CACHE_DIR=str(cache_dir()))
    cache = tmp / "cache"
    res = run_cli("imatrix", "--model", str(tiny_checkpoint), "--suite", str(suite), "--cache-dir", str(cache),
                  env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (folder,) = [p for p in (cache / "imatrix").iterdir() if p.is_dir()]
    return {"tmp": tmp, "env": env, "suite": suite, "cache": cache, "res": res, "folder": folder,
            "manifest": json.loads((folder / "manifest.json").read_text())}


def test_imatrix_records_the_model_suite_and_split(imatrix_run):
    m = imatrix_run["manifest"]
    (ref,) = list((imatrix_run["cache"] / "artifacts").rglob("BF16-*.gguf"))
    import hashlib

    assert m["reference_sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert m["sha256"] == hashlib.sha256((imatrix_run["folder"] / "imatrix.gguf").read_bytes()).hexdigest()
    split = split_suite(load_suite(imatrix_run["suite"]))
    assert m["split"]["calibration"] == list(split.calibration)
    stored = db_rows(imatrix_run["tmp"] / "results.db",
                     "SELECT case_id, role FROM calibration_splits WHERE split_sha256 = ?", split.sha256)
    assert {r["case_id"] for r in stored if r["role"] == "calibration"} == set(split.calibration)
    assert {r["case_id"] for r in stored if r["role"] == "evaluation"} == set(split.evaluation)
    assert m["n_tokens"] >= 2 * m["chunk_size"]


def test_imatrix_holds_activation_statistics_of_the_model_tensors(imatrix_run):
    data = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(imatrix_run["folder"] / "imatrix.gguf")).tensors}
    (ref,) = list((imatrix_run["cache"] / "artifacts").rglob("BF16-*.gguf"))
    model = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    sums = [n for n in data if n.endswith(".in_sum2")]
    assert any(n.startswith("blk.0.attn_q.weight") for n in sums) and any("ffn_down" in n for n in sums)
    for name in sums:
        base = name.removesuffix(".in_sum2")
        assert base in model
        # one importance value per input column of the weight (its first GGUF dimension)
        assert data[name].size == int(model[base].shape[0])
        assert np.all(data[name] >= 0) and np.any(data[name] > 0)


def test_a_second_imatrix_call_reuses_the_cached_file(imatrix_run, tiny_checkpoint):
    before = (imatrix_run["folder"] / "imatrix.gguf").stat().st_mtime_ns
    res = run_cli("imatrix", "--model", str(tiny_checkpoint), "--suite", str(imatrix_run["suite"]),
                  "--cache-dir", str(imatrix_run["cache"]), env=imatrix_run["env"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (imatrix_run["folder"] / "imatrix.gguf").stat().st_mtime_ns == before
    assert "llama-imatrix:" not in res.stderr


def test_imatrix_rungs_are_built_with_the_matrix(imatrix_run, tiny_checkpoint):
    profile = write_profile(imatrix_run["tmp"], ["Q4_K_M", "Q4_K_M+imatrix", "IQ2_XS+imatrix"], "withimx")
    res = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite",
                  str(imatrix_run["suite"]), "--cache-dir", str(imatrix_run["cache"]), "--json",
                  env=imatrix_run["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    arts = {a["quant"]: a for a in json.loads(res.stdout)}
    assert arts["Q4_K_M+imatrix"]["sha256"] != arts["Q4_K_M"]["sha256"]
    # llama.cpp refuses IQ2_XS without an importance matrix: this file exists only because it got one
    types = tensor_types(Path(arts["IQ2_XS+imatrix"]["path"]))
    assert "IQ2_XS" in set(types.values())
    # the cached imatrix was used, not recomputed
    assert len([p for p in (imatrix_run["cache"] / "imatrix").iterdir() if p.is_dir()]) == 1
    # the file says how it was made, under llama-quantize's keys, read back by the gguf package's own reader
    m = imatrix_run["manifest"]
    fields = gguf.GGUFReader(arts["Q4_K_M+imatrix"]["path"]).fields

    def value(key):
        f = fields[key]
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(part[0])

    assert m["sha256"] in value("quantize.imatrix.file")
    assert m["suite"] in value("quantize.imatrix.dataset")
    assert f"{len(m['split']['calibration'])} cases" in value("quantize.imatrix.dataset")
    assert value("quantize.imatrix.chunks_count") == m["n_tokens"] // m["chunk_size"]
    imx = gguf.GGUFReader(str(imatrix_run["folder"] / "imatrix.gguf"))
    assert value("quantize.imatrix.entries_count") == len([t for t in imx.tensors if t.name.endswith(".in_sum2")])
    assert not any(k.startswith("quantize.imatrix") for k in gguf.GGUFReader(arts["Q4_K_M"]["path"]).fields)


def test_an_imatrix_for_another_model_is_refused(imatrix_run, tmp_path):
    from tiny_model import make_tiny_gemma3

    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint
    from edgequant.quantize.imatrix import open_imatrix
    from edgequant.quantize.ladder import ImatrixProvider, Ladder

    other = open_checkpoint(make_tiny_gemma3(tmp_path / "other", seed=1))
    theirs = open_imatrix(imatrix_run["folder"] / "imatrix.gguf")

    class Theirs(ImatrixProvider):  # hands over the first model's imatrix, whatever the reference
        identity = "theirs"

        def get(self, reference, report):
            return theirs

    profile = load_profile(write_profile(tmp_path, ["Q4_K_M+imatrix"], "other"))
    ladder = Ladder(other, checkpoint_hash(other, tmp_path / "h.json"), profile, tmp_path / "cache", Theirs())
    with pytest.raises(BadInput) as exc:
        ladder.build()
    assert f"computed for model {theirs.reference_sha256[:12]}" in str(exc.value)
    assert not list((tmp_path / "cache").rglob("Q4_K_M+imatrix*.gguf"))


@pytest.mark.slow
def test_a_run_with_imatrix_rungs_judges_on_the_evaluation_half_only(imatrix_run, tiny_checkpoint):
    profile = write_profile(imatrix_run["tmp"], ["Q4_K_M+imatrix", "Q8_0", "Q4_K_M"], "runimx")
    db = imatrix_run["tmp"] / "run.db"
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite",
                  str(imatrix_run["suite"]), "--cache-dir", str(imatrix_run["cache"]), "--db", str(db),
                  env=imatrix_run["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    # the table shows a rung with modifiers next to its plain type, whatever the profile's order
    rows = [ln.split("│")[1].strip() for ln in res.stdout.splitlines() if ln.startswith("│")]
    first = rows[:rows.index("Q8_0") + 1]
    assert first == ["BF16 (ref)", "Q4_K_M+imatrix", "Q4_K_M", "Q8_0"], rows
    split = split_suite(load_suite(imatrix_run["suite"]))
    for quant in ("BF16", "Q4_K_M", "Q4_K_M+imatrix", "Q8_0"):
        ids = {r["case_id"] for r in db_rows(db, "SELECT case_id FROM eval_cases WHERE quant = ?", quant)}
        assert ids == set(split.evaluation), quant
    params = {json.loads(r["params"]).get("split") for r in
              db_rows(db, "SELECT params FROM measurements WHERE metric = 'xml_parse_rate'")}
    assert params == {split.sha256}
