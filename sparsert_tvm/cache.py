"""A content-addressed on-disk cache for compiled kernels.

Keys are hashes of everything that determines the output (PTX text, tool versions,
flags), so a changed weight can never hit a stale entry. Writes go to a temporary file
and are renamed into place, so concurrent compiles and interrupted writes never leave a
partial entry; entries carry their own digest and a corrupt one is ignored and rebuilt.

``SPARSERT_CACHE_DIR`` moves the cache; ``SPARSERT_CACHE=0`` turns it off;
``SPARSERT_CACHE=refresh`` builds everything anew and stores it (a timed cold compile that
still leaves its entries for the builds after it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_MAGIC = b"sparsert-cache-v1\n"


def cache_dir() -> Path | None:
    if os.environ.get("SPARSERT_CACHE", "1").lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get("SPARSERT_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsert-tvm"


def cache_key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load(kind: str, key: str) -> bytes | None:
    root = cache_dir()
    if root is None or os.environ.get("SPARSERT_CACHE", "").lower() == "refresh":
        return None
    try:
        blob = (root / kind / key).read_bytes()
    except OSError:
        return None
    header_len = len(_MAGIC) + 64
    if len(blob) < header_len or not blob.startswith(_MAGIC):
        return None
    digest, payload = blob[len(_MAGIC) : header_len].decode(errors="replace"), blob[header_len:]
    if hashlib.sha256(payload).hexdigest() != digest:
        return None
    return payload


def store(kind: str, key: str, payload: bytes) -> None:
    root = cache_dir()
    if root is None:
        return
    folder = root / kind
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload)
        os.replace(tmp, folder / key)
        tmp = None
    except OSError:
        # A read-only or full disk costs a recompile next time, nothing more.
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
