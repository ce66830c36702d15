"""``python -m edgequant.cli``: the same as the ``edgequant`` command."""

from edgequant.cli import entry

entry()
