"""Default locations, following the XDG base directory conventions.

``EDGEQUANT_CACHE_DIR`` and ``EDGEQUANT_DB`` override the defaults; the CLI's
``--cache-dir`` and ``--db`` options override both.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("EDGEQUANT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgequant"


def default_db() -> str:
    env = os.environ.get("EDGEQUANT_DB")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return str(Path(base) / "edgequant" / "results.db")
