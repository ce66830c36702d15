""".ci/system-deps (what `make test` runs first): quiet when every package is there, installs the missing ones
as root with apt-get, and otherwise stops at once with one line naming them and the command that installs them.
dpkg-query, id and apt-get are stand-ins on PATH: the script's logic is real, nothing is installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "system-deps"


def _tools(tmp_path: Path, missing: set[str], uid: int) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        # the real dpkg-query prints the db status of the package named last
        "dpkg-query": "pkg=\"${@: -1}\"\ncase \" %s \" in *\" $pkg \"*) echo -n not-installed ;; "
                      "*) echo -n installed ;; esac\n" % " ".join(sorted(missing)),
        "id": f"echo {uid}\n",
        "apt-get": f"echo \"$*\" >> {tmp_path / 'apt.log'}\n",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, missing: set[str], uid: int) -> subprocess.CompletedProcess:
    bin_dir = _tools(tmp_path, missing, uid)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    return subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_nothing_missing_is_quiet(tmp_path):
    r = _run(tmp_path, set(), uid=1000)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert not (tmp_path / "apt.log").exists()


def test_without_root_it_stops_with_one_line_naming_the_packages(tmp_path):
    r = _run(tmp_path, {"mksh", "qemu-user-static"}, uid=1000)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgequant: error:")
    assert lines[0].endswith("sudo apt-get install -y qemu-user-static mksh")
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("missing", [{"chromium"}, {"toybox", "postgresql"}])
def test_as_root_it_installs_only_the_missing_ones(tmp_path, missing):
    r = _run(tmp_path, missing, uid=0)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0] == "update -qq"
    installed = calls[1].split()
    assert installed[:3] == ["install", "-y", "-qq"]
    assert set(installed[3:]) == missing
