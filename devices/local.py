"""This host's own shell behind the device transport interface (``devices.transport.Transport``), so the
measured command (``bench.device_bench.run_measured``: the time command and the /proc poller) runs here
exactly as on a phone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from edgequant.devices.transport import DeviceError, ProgressFn, ShellResult


class LocalTransport:
    serial = "host"
    kind = "local"

    def shell(self, command: str, timeout: float) -> ShellResult:
        proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)     # its own process group: killed whole at the deadline
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeviceError("timeout", f"this host's shell did not finish `{command[:80]}` within {timeout:g} s")
        return ShellResult(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def push(self, local: Path, remote: str, on_progress: ProgressFn | None = None,
             timeout: float | None = None) -> None:
        tmp = Path(remote + ".part")
        shutil.copyfile(local, tmp)
        tmp.chmod(0o755 if os.access(local, os.X_OK) else 0o644)
        tmp.replace(remote)

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        tmp = Path(str(local) + ".part")
        shutil.copyfile(remote, tmp)
        tmp.replace(local)

    def close(self) -> None:
        pass
