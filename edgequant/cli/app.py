"""The root ``edgequant`` command group; the command modules register their commands on it."""

from __future__ import annotations

import click

from edgequant import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgequant")
def cli():
    """Measure what each quantization level of a model costs and breaks.

    edgequant converts a bf16 Hugging Face checkpoint into a ladder of GGUF
    quantizations, benchmarks every rung like llama-bench, stores every figure
    and prints a comparison table against the bf16 reference.
    """
