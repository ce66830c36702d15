"""Each command's help says what it does today (click's own runner over the real command group)."""

from __future__ import annotations

from click.testing import CliRunner

from edgequant.cli import cli


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())   # click wraps lines: compare words


def test_quantize_help_names_the_onnx_variants_it_builds():
    text = _help("quantize")
    assert "[onnx] variants" in text and "GGUF ladder" in text


def test_every_command_has_help():
    top = _help()
    for name, command in cli.commands.items():
        assert name in top
        assert (command.help or "").strip(), f"{name} has no help text"


def test_run_report_and_export_help_say_what_they_do_today():
    run = _help("run")
    assert "[onnx] variants" in run and "--resume RUN_ID finishes it" in run and "in parallel" in run
    report = _help("report")
    assert "--cases" in report.split("Options:")[0] and "--html" in report.split("Options:")[0]
    assert "llama-bench's own JSON or SQL output" in _help("export").split("Options:")[0]
