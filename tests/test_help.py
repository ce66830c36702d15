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
