"""The package's layers import one way, share no private names, and keep their modules small.

Every module of the package is parsed with ``ast`` (nothing is imported).  The layer of a module is its
folder: ``edgequant/core`` (the ground), ``profiles`` (config), ``quantize`` and ``devices``, ``bench``,
``results``, then the pipeline (``edgequant/pipeline`` and the other modules at the package root:
farm, noise, ...) and ``edgequant/cli`` on top.  A module may import its own layer and the layers below
it as the table says (README, "Architecture"); nothing imports the CLI.  The checker is tested on a small
tree with known violations too, so a broken checker cannot pass the real tree by finding nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# import name prefix -> folder (pyproject's package-dir mapping)
FOLDERS = {"edgequant.quantize": "quantize", "edgequant.profiles": "profiles", "edgequant.devices": "devices",
           "edgequant.bench": "bench", "edgequant.results": "results", "edgequant": "edgequant"}

# layer -> the layers it may import (its own included); "root" is edgequant/__init__.py (only __version__)
ALLOWED = {
    "root": {"root"},
    "core": {"root", "core"},
    "profiles": {"root", "core", "profiles"},
    "quantize": {"root", "core", "profiles", "quantize"},
    "devices": {"root", "core", "profiles", "devices"},
    "bench": {"root", "core", "profiles", "quantize", "devices", "bench"},
    "results": {"root", "core", "profiles", "quantize", "devices", "bench", "results"},
    "pipeline": {"root", "core", "profiles", "quantize", "devices", "bench", "results", "pipeline"},
    "cli": {"root", "core", "profiles", "quantize", "devices", "bench", "results", "pipeline", "cli"},
}
CLI_MAX_LINES = 400
MAX_LINES = 600
# modules over MAX_LINES with no clean seam yet, each with its reason; the list may only shrink (it is empty)
OVERSIZE: dict[str, int] = {}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    folder = parts[0]
    prefix = next(k for k, v in FOLDERS.items() if v == folder)
    name = ".".join([prefix, *parts[1:]])
    return name.removesuffix(".__init__")


def layer(name: str) -> str:
    parts = name.split(".")
    if parts == ["edgequant"]:
        return "root"
    if parts[1] in ("core", "profiles", "quantize", "devices", "bench", "results", "cli"):
        return parts[1]
    return "pipeline"     # edgequant/pipeline/ and the modules at the package root (farm, noise, ...)


def package_modules(root: Path) -> dict[str, Path]:
    out = {}
    for folder in FOLDERS.values():
        for path in sorted((root / folder).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def _imports(tree: ast.AST):
    """(line, imported module, names) for every import of ours, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "edgequant" or a.name.startswith("edgequant."):
                    yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "edgequant" or node.module.startswith("edgequant.")):
            yield node.lineno, node.module, [a.name for a in node.names]


def violations(root: Path) -> list[str]:
    """Every breach of the layer table, every private name imported from another module, every module over
    its size limit, as one line each (``module:line what``)."""
    mods = package_modules(root)
    out = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        mine = layer(name)
        for line, target, names in _imports(tree):
            # `from edgequant.bench import quality` imports the module edgequant.bench.quality
            targets = [f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names] or [target]
            for t, n in zip(targets, names or [None]):
                theirs = layer(t)
                if theirs not in ALLOWED[mine]:
                    out.append(f"{name}:{line} imports {t} ({mine} may not import {theirs})")
                if (n is not None and n.startswith("_") and not n.startswith("__") and t != name
                        and f"{target}.{n}" not in mods):
                    out.append(f"{name}:{line} imports the private name {n} from {t}")
        lines = text.count("\n")
        limit = CLI_MAX_LINES if mine == "cli" else OVERSIZE.get(name, MAX_LINES)
        if lines > limit:
            out.append(f"{name} has {lines} lines, over its limit of {limit}")
    return sorted(out)


def test_the_package_keeps_its_layers_private_names_and_sizes():
    assert violations(ROOT) == []


def test_the_oversize_list_names_only_modules_that_need_it():
    mods = package_modules(ROOT)
    for name in OVERSIZE:
        assert name in mods, name
        assert mods[name].read_text(encoding="utf-8").count("\n") > MAX_LINES, f"{name} fits now: drop it"


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    for folder in FOLDERS.values():
        _write(tmp_path, f"{folder}/__init__.py", "")
    _write(tmp_path, "edgequant/core/__init__.py", "")
    _write(tmp_path, "edgequant/core/errors.py", "from edgequant.devices import select\n")            # up
    _write(tmp_path, "profiles/rungs.py", "def f():\n    from edgequant.quantize import ladder\n")     # sideways
    _write(tmp_path, "quantize/ladder.py", "from edgequant.core.errors import BadInput\n")            # fine
    _write(tmp_path, "devices/select.py", "from edgequant.quantize.ladder import _private\n")         # private
    _write(tmp_path, "bench/host.py", "import edgequant.results.store\n")                          # up
    _write(tmp_path, "results/store.py", "from edgequant import __version__\n" + "x = 1\n" * 601)    # size
    _write(tmp_path, "results/report.py", "from edgequant.results.store import x\n")                 # fine
    _write(tmp_path, "edgequant/farm.py", "from edgequant.cli import main\n")                        # up
    _write(tmp_path, "edgequant/cli/__init__.py", "from edgequant import farm\n" + "y = 2\n" * 401)  # size
    assert violations(tmp_path) == sorted([
        "edgequant.bench.host:1 imports edgequant.results.store (bench may not import results)",
        "edgequant.cli has 402 lines, over its limit of 400",
        "edgequant.core.errors:1 imports edgequant.devices.select (core may not import devices)",
        "edgequant.devices.select:1 imports edgequant.quantize.ladder (devices may not import quantize)",
        "edgequant.devices.select:1 imports the private name _private from edgequant.quantize.ladder",
        "edgequant.farm:1 imports edgequant.cli (pipeline may not import cli)",
        "edgequant.profiles.rungs:2 imports edgequant.quantize.ladder (profiles may not import quantize)",
        "edgequant.results.store has 602 lines, over its limit of 600",
    ])


def test_a_host_run_does_not_load_logging():
    """``logging`` registers at-fork hooks; a SIGTERM that arrives while a run forks a worker is raised inside
    one of them and ignored there, so the run would not stop (test_faults' SIGTERM test).  What a host run
    imports must leave it out (concurrent.futures, which imports it, is imported only for phones)."""
    code = ("import sys, edgequant.cli, edgequant.farm, edgequant.estimate, edgequant.pipeline.host, "
            "edgequant.pipeline.run, edgequant.pipeline.calibrate, edgequant.pipeline.executor, "
            "edgequant.pipeline.runtime_llamacpp, edgequant.pipeline.runtime_onnx, edgequant.pipeline.places; "
            "print('logging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
