"""Cached artifacts whose content is checked: what GGUF rungs (``quantize.ladder``) and ONNX rungs
(``quantize.onnx_export``) share.

An artifact is one or more files (a GGUF; an ONNX ``model.onnx`` and its external data) whose sha256 was
recorded in a manifest when it was built.  With it the manifest keeps the files' *signature*: name, size,
mtime and ctime of each, as they were when their sha256 was last checked.  A signature that still matches
means nothing wrote to the files since (a write moves ctime, whatever mtime is set back to); one that
moved means they are hashed again, and used only if the bytes are the ones recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from edgequant.core.errors import RunFailed
from edgequant.core.atomic import atomic_write_text

# report(task, done, total): task names the step, done/total in bytes (total None = unknown)
Progress = Callable[[str, float, "float | None"], None]

Signature = tuple[tuple[str, int, int, int], ...]


class ArtifactChanged(RunFailed):
    """An artifact's files no longer hold the bytes their recorded sha256 names."""


def files_signature(files: Iterable[Path]) -> Signature:
    """(name, size, mtime_ns, ctime_ns) of each file: what says the files may have changed since."""
    out = []
    for f in files:
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def signature_of(data: dict[str, Any], single: Path | None = None) -> Signature | None:
    """The signature recorded in a manifest (``data``, from which it is removed), or None if it has none.
    ``single``: the one file of a GGUF artifact, whose older manifests kept its mtime and ctime apart."""
    recorded = data.pop("signature", None)
    legacy = (data.pop("mtime_ns", None), data.pop("ctime_ns", None))
    if recorded is not None:
        try:
            return tuple((str(n), int(s), int(m), int(c)) for n, s, m, c in recorded)
        except (TypeError, ValueError):
            return None
    if single is not None and None not in legacy and "size_bytes" in data:
        return ((single.name, int(data["size_bytes"]), int(legacy[0]), int(legacy[1])),)
    return None


def write_manifest(art, manifest: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (the artifact's record) as its manifest, with the signature of its files now: the
    check of their sha256 is as new as the files (call it only right after hashing or building them)."""
    art.checked = art.signature()
    atomic_write_text(manifest, json.dumps({**data, "signature": [list(s) for s in art.checked]}, indent=2,
                                           sort_keys=True))


def recheck(art, recorded: Signature | None, report: Progress = lambda *a: None) -> str | None:
    """Whether ``art``'s files still hold the bytes whose sha256 it records: None if they do (hashed again
    only if their signature moved since ``recorded``; ``art.checked`` is then set), else why not."""
    try:
        now = art.signature()
    except OSError as exc:
        return f"its files cannot be read ({exc.strerror or exc})"
    if recorded is not None and now == recorded:
        art.checked = now
        return None
    size = sum(s for _n, s, _m, _c in now)
    report(f"checking {art.quant}", 0, size)
    try:
        digest = art.content_sha256()
    except OSError as exc:
        return f"its files cannot be read ({exc.strerror or exc})"
    report(f"checking {art.quant}", size, size)
    if digest != art.sha256:
        return f"its sha256 is {digest[:12]}…, not the {art.sha256[:12]}… recorded when it was built"
    if size != art.size_bytes:
        return f"it holds {size} bytes, not the {art.size_bytes} recorded when it was built"
    art.checked = now
    return None


def verify(art) -> None:
    """Before a benchmark or a push: ``art``'s files still hold the bytes whose sha256 is recorded.  Hashed
    again only if they changed on disk since they were checked; :class:`ArtifactChanged` if their bytes
    differ.  An artifact never checked here (``art.checked`` None) is taken as it is."""
    if art.checked is None:
        return
    try:
        now = art.signature()
    except OSError as exc:
        raise ArtifactChanged(f"artifact {art.quant} {art.path}: cannot be read any more "
                              f"({exc.strerror or exc}); {art.advice()}") from None
    if now == art.checked:
        return
    digest = art.content_sha256()
    if digest != art.sha256:
        raise ArtifactChanged(f"artifact {art.quant} {art.path}: its bytes changed on disk since they were "
                              f"checked (sha256 {digest[:12]}… instead of {art.sha256[:12]}…); {art.advice()}")
    art.checked = now


@dataclass
class CacheCheck:
    path: Path
    quant: str
    status: str          # ok, damaged (removed), unrecorded (no manifest: removed)
    detail: str = ""


def check_entry(path: Path, manifest: Path, label: str, digest: Callable[[], str], remove: Callable[[], None],
                signature: Callable[[], Signature], report: Progress = lambda *a: None) -> CacheCheck:
    """Hash one cached artifact (``path``, its files hashed by ``digest``) against the sha256 its
    ``manifest`` records (``edgequant quantize --verify``).  A damaged one, or one with no readable record,
    is removed (``remove``): the next build makes it again.  A sound one's manifest gets the new signature.
    ``label`` names it when the manifest does not."""
    try:
        data = json.loads(manifest.read_text())
        recorded, quant = str(data["sha256"]), str(data.get("quant") or label)
    except (OSError, ValueError, KeyError, TypeError):
        remove()
        manifest.unlink(missing_ok=True)
        return CacheCheck(path, label, "unrecorded", "no readable record of its sha256; removed")
    try:
        before = signature()
        size = sum(s for _n, s, _m, _c in before)
        report(f"checking {quant}", 0, size)
        got = digest()
        report(f"checking {quant}", size, size)
    except OSError as exc:
        got, before = f"unreadable ({exc.strerror or exc})", ()
    if got != recorded:
        remove()
        manifest.unlink(missing_ok=True)
        return CacheCheck(path, quant, "damaged", f"sha256 {got[:12]}…, recorded {recorded[:12]}…; removed")
    signature_of(data)                    # the old one, replaced by the one the bytes were hashed under
    atomic_write_text(manifest, json.dumps({**data, "signature": [list(s) for s in before]}, indent=2,
                                           sort_keys=True))
    return CacheCheck(path, quant, "ok", recorded[:12])
