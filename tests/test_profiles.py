"""Profiles are validated at load time; errors name the file, the field and the allowed values."""

from __future__ import annotations

import pytest

from edgequant.core.errors import BadInput
from edgequant.profiles import builtin_profiles, load_profile, quant_types, with_bench_overrides


def write(tmp_path, text: str):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_builtin_default_profile_covers_the_ladder():
    prof = load_profile("default")
    assert prof.rungs()[0] == "BF16"
    for t in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"):
        assert t in prof.quant.types
    assert prof.bench.n_prompt == 512 and prof.bench.n_gen == 128
    assert prof.bench.repetitions >= 3 and prof.bench.warmup >= 1
    assert {"default", "quick"} <= set(builtin_profiles())


def test_quant_type_names_come_from_the_gguf_and_llama_cpp_enums():
    import gguf
    import llama_cpp

    names = quant_types()
    assert names["Q4_K_M"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert names["BF16"] == llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    assert "GUESSED" not in names


def test_unknown_quant_type_names_file_field_and_valid_types(tmp_path):
    p = write(tmp_path, '[quantize]\ntypes = ["Q8_0", "Q4_K_X"]\n')
    with pytest.raises(BadInput) as err:
        load_profile(p)
    msg = str(err.value)
    assert str(p) in msg and "quantize.types[1]" in msg and "Q4_K_X" in msg
    assert "Q4_K_M" in msg and "IQ4_XS" in msg  # the valid names are listed


@pytest.mark.parametrize("text, field", [
    ("[bench]\nrepetitions = 2\n", "bench.repetitions"),
    ("[bench]\nthreads = \"two\"\n", "bench.threads"),
    ("[bench]\nflash_attn = \"maybe\"\n", "bench.flash_attn"),
    ("[bench]\nn_batch = 256\nn_ubatch = 512\n", "bench.n_ubatch"),
    ("[bench]\nprompt = 5\n", "bench.prompt"),
    ("[quantize]\nreference = \"Q8_0\"\n", "quantize.reference"),
    ("[quantize]\ntypes = [\"IQ2_XXS\"]\n", "quantize.types[0]"),
    ("[quantize]\ntypes = [\"Q8_0\", \"Q8_0\"]\n", "quantize.types[1]"),
    ("[quantize.options]\npure = \"yes\"\n", "quantize.options.pure"),
    ("[extra]\nx = 1\n", "extra"),
])
def test_bad_fields_are_named(tmp_path, text, field):
    p = write(tmp_path, text)
    with pytest.raises(BadInput) as err:
        load_profile(p)
    assert f"'{field}'" in str(err.value) and str(p) in str(err.value)


def test_invalid_toml_and_missing_files(tmp_path):
    p = write(tmp_path, "[bench\n")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_profile(p)
    with pytest.raises(BadInput, match="built-in profiles: default"):
        load_profile("no-such-profile")
    with pytest.raises(BadInput, match="no such file"):
        load_profile(tmp_path / "missing.toml")


def test_command_line_overrides_are_validated():
    prof = load_profile("quick")
    changed = with_bench_overrides(prof, n_prompt=64, threads=None)
    assert changed.bench.n_prompt == 64 and changed.bench.n_gen == prof.bench.n_gen
    with pytest.raises(BadInput, match="bench.repetitions"):
        with_bench_overrides(prof, repetitions=1)


def test_loading_does_not_touch_the_environment(tmp_path, monkeypatch):
    import os

    before = dict(os.environ)
    load_profile(write(tmp_path, "[bench]\nthreads = 1\n"))
    assert dict(os.environ) == before


# ---------------------------------------------------------------------------
# depths and KV cache types (issue 18)


def test_depths_and_cache_types_load_and_expand_into_named_variants(tmp_path):
    from edgequant.profiles.variants import base_quant, expand

    p = write(tmp_path, '[bench]\ndepths = [0, 512, "suite"]\ncache_types = ["f16", "Q8_0"]\n')
    bench = load_profile(p).bench
    assert bench.depths == (0, 512, "suite") and bench.cache_types == ("f16", "q8_0")
    assert bench.has_variants and not load_profile("default").bench.has_variants
    # "suite" resolves to each format's prefix; equal lengths (and a number equal to one) are one depth
    vs = expand(bench, {"xml": 300, "array": 512, "esi": 300}, "triage")
    names = [v.name("Q4_K_M") for v in vs]
    assert names == ["Q4_K_M", "Q4_K_M@d512", "Q4_K_M@d300",
                     "Q4_K_M@kv=q8_0", "Q4_K_M@d512,kv=q8_0", "Q4_K_M@d300,kv=q8_0"]
    assert {base_quant(n) for n in names} == {"Q4_K_M"}
    by_name = dict(zip(names, vs))
    assert by_name["Q4_K_M@d300"].depth_source == "suite triage: xml, esi prefix"
    assert by_name["Q4_K_M@d512"].depth_source == "suite triage: array prefix"
    base = {"runner": "host", "flash_attn": "auto"}
    # the plain variant's parameters are the plain profile's, so its rows pair with older runs
    assert by_name["Q4_K_M"].params(base, bench) == base
    assert by_name["Q4_K_M@d512,kv=q8_0"].params(base, bench) == {
        "runner": "host", "n_depth": 512, "depth_source": "suite triage: array prefix",
        "cache_type": "q8_0", "flash_attn": "on"}   # a quantized V cache forces flash attention on


@pytest.mark.parametrize("text, field, allowed", [
    ('[bench]\ncache_types = ["q3_k"]\n', "bench.cache_types[0]", "q8_0"),
    ('[bench]\ncache_types = ["f16", "q4_0"]\nflash_attn = "off"\n', "bench.cache_types[1]", "flash_attn"),
    ('[bench]\ncache_types = []\n', "bench.cache_types", "f16"),
    ('[bench]\ncache_types = ["q8_0", "Q8_0"]\n', "bench.cache_types[1]", "repeats"),
    ('[bench]\ndepths = [-1]\n', "bench.depths[0]", "suite"),
    ('[bench]\ndepths = ["deep"]\n', "bench.depths[0]", "suite"),
    ('[bench]\ndepths = [512, 512]\n', "bench.depths[1]", "repeats"),
    ('[bench]\ndepths = 512\n', "bench.depths", "list"),
])
def test_bad_depths_and_cache_types_are_one_line_naming_the_field(tmp_path, text, field, allowed):
    p = write(tmp_path, text)
    with pytest.raises(BadInput) as err:
        load_profile(p)
    msg = str(err.value)
    assert f"'{field}'" in msg and allowed in msg and str(p) in msg and "\n" not in msg


def test_a_bf16_cache_needs_no_flash_attention(tmp_path):
    # only a quantized V cache needs it (llama.cpp: ggml_is_quantized(type_v)); bf16 is not quantized
    p = write(tmp_path, '[bench]\ncache_types = ["bf16"]\nflash_attn = "off"\n')
    assert load_profile(p).bench.cache_types == ("bf16",)
