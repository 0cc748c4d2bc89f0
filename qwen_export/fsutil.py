"""Atomic output folders: work happens in a temporary sibling that is renamed into place at the end."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from qwen_export.errors import QwenExportError


def check_writable_parent(out: Path) -> Path:
    """Resolve `out` and fail early, before any work, if a folder cannot be created there."""
    out = Path(out).expanduser().resolve()
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QwenExportError(f"output folder {out} is not writable ({ancestor} is a file, not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise QwenExportError(f"output folder {out} is not writable (no write permission on {ancestor})")
    if out.exists() and not out.is_dir():
        raise QwenExportError(f"output path {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed.

    An existing `out` is replaced only after the new content is complete, so a failed run never leaves a
    half-written artifact behind (and never destroys the previous good one).
    """
    out = check_writable_parent(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise QwenExportError(f"output folder {out} is not writable ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact should look like any folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing what is there. Another writer of the same folder (two builds filling
    one cache entry) may publish between our moving the old folder aside and our rename: then try again,
    last writer wins, and neither sees a half-written folder."""
    for _ in range(16):
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            out.rename(old)
        except FileNotFoundError:
            old = None
        try:
            tmp.rename(out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    raise QwenExportError(f"could not publish {out}: other writers kept replacing it")
