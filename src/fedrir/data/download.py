"""Fetch and unpack a dataset archive: checksummed, atomic, and safe against hostile tarballs.

A download streams to a temporary file next to its destination and is moved into place only once
its checksum matches, so an interrupted or corrupt transfer never leaves a file that looks valid.
Extraction rejects members with absolute paths or ``..`` and unpacks into a temporary folder that
is moved into place whole. Every failure is a one-line :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from fedrir.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, verifying its md5 or sha256 (one is required)."""
    if (md5 is None) == (sha256 is None):
        raise ValueError("give exactly one of md5 or sha256")
    algorithm, expected = ("md5", md5) if md5 is not None else ("sha256", sha256)
    assert expected is not None
    hasher = hashlib.new(algorithm)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s to %s", url, dest)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
        got = hasher.hexdigest()
        if got != expected.lower():
            raise DataError(
                f"checksum mismatch for {url}: expected {algorithm} {expected}, got {got}; "
                "the download is corrupt or the file changed upstream, try again later"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DataError(
            f"cannot download {url}: {reason}; check the network, or fetch it by hand into "
            f"{dest.parent}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def extract_tar(archive: Path, dest: Path, top: str) -> Path:
    """Unpack ``archive``, whose members must all sit under ``top/``, into ``dest/top``."""
    target = dest / top
    if target.exists():
        raise DataError(f"{target} already exists; remove it before extracting {archive.name}")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=dest))
    except OSError as e:
        raise DataError(f"cannot write to {dest}: {e.strerror or e}") from None
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name)
                if path.is_absolute() or ".." in path.parts or path.parts[:1] != (top,):
                    raise DataError(
                        f"refusing to extract {archive}: unsafe or unexpected member {m.name!r} "
                        f"(everything must sit under {top}/)"
                    )
            tar.extractall(work, members=members, filter="data")
        os.replace(work / top, target)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot extract {archive}: {e}; delete it and download it again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
