"""The content-addressed artifact store.

Layout under the store root (default: the user cache dir, ``$ACCELC_CACHE_DIR`` or
``--cache-dir`` override it)::

    entries/<key>/meta.json    kind, primary file, per-file sha256, tree digest, metrics
    entries/<key>/<payload>    the files the pass wrote
    tmp/<key>.<random>/        staging while a pass runs (never trusted)
    locks/<key>.lock           one builder per key at a time

Guarantees:

* **Atomic writes.** A pass writes into a staging dir; ``commit`` hashes the files,
  writes ``meta.json`` last and renames the dir into ``entries/`` in one ``rename``.
  An interrupted build leaves only staging dirs, which nothing reads.
* **One builder per key.** ``lock(key)`` is a ``filelock`` lock; a second build of
  the same key waits, then finds the entry and reuses it.
* **Checked reads.** ``open(key)`` re-hashes every file and compares with
  ``meta.json``; a mismatch raises :class:`CorruptEntryError` and the executor
  evicts and rebuilds the entry.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .artifacts import Artifact, file_digests, tree_digest
from .errors import CacheError, CorruptEntryError

META = "meta.json"
ENV_VAR = "ACCELC_CACHE_DIR"


def default_root() -> Path:
    """``$ACCELC_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("accelc")``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    import platformdirs

    return Path(platformdirs.user_cache_dir("accelc"))


@dataclass(frozen=True)
class EntryInfo:
    """What ``meta.json`` says about an entry (no digest check)."""

    key: str
    meta: dict[str, Any]
    path: Path

    @property
    def size_bytes(self) -> int:
        return int(self.meta.get("size_bytes", 0))


class Store:
    """A content-addressed store rooted at ``root``. See the module docstring for guarantees."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        try:
            for d in (self.entries, self.tmp, self.locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cache directory {self.root} is not usable: {e.strerror or e}") from e

    # -- reading -----------------------------------------------------------------------------
    def lookup(self, key: str) -> EntryInfo | None:
        """The entry's metadata if a committed entry exists (files are not re-hashed here)."""
        path = self.entries / key
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        return EntryInfo(key, meta, path)

    def open(self, key: str, verify: bool = True) -> Artifact:
        """The entry as an :class:`Artifact`, after checking every file against its recorded sha256.

        Raises:
            CorruptEntryError: the entry is missing files, has extra or changed bytes, or bad metadata.
        """
        info = self.lookup(key)
        if info is None:
            raise CorruptEntryError(f"cache entry {key[:12]} has no readable {META}")
        meta = info.meta
        if verify:
            actual = file_digests(info.path, exclude=(META,))
            expected = meta.get("files", {})
            if actual != expected:
                changed = sorted(
                    set(k for k in expected if actual.get(k) != expected[k]) | (set(actual) - set(expected))
                )
                raise CorruptEntryError(
                    f"cache entry {key[:12]} ({meta.get('node', '?')}) does not match its recorded digest: "
                    f"{', '.join(changed) or 'files'} changed or missing"
                )
        self.touch(key)
        return Artifact(
            kind=meta["kind"], path=info.path, main=meta["main"], digest=meta["digest"], meta=meta.get("meta", {})
        )

    def touch(self, key: str) -> None:
        """Record use (for least-recently-used eviction): bump the entry dir's mtime."""
        try:
            os.utime(self.entries / key)
        except OSError:
            pass

    # -- writing -----------------------------------------------------------------------------
    def lock(self, key: str, timeout: float = -1) -> FileLock:
        """An inter-process lock for building ``key``."""
        return FileLock(str(self.locks / f"{key}.lock"), timeout=timeout)

    def staging(self, key: str) -> Path:
        """A fresh, empty staging dir for building ``key``."""
        d = self.tmp / f"{key}.{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(self, key: str, staging: Path, kind: str, main: str, record: dict[str, Any]) -> Artifact:
        """Seal ``staging`` as entry ``key`` (hash files, write meta.json, rename into place).

        If another process committed ``key`` meanwhile, its entry wins and ``staging`` is discarded.

        Raises:
            CacheError: the disk filled up or the store is not writable; ``staging`` is removed.
        """
        if not (staging / main).exists():
            raise CacheError(f"pass output has no primary file '{main}' in {staging}")
        try:
            files = file_digests(staging, exclude=(META,))
            digest = tree_digest(files)
            size = sum((staging / f).stat().st_size for f in files)
            meta = {
                "key": key,
                "kind": kind,
                "main": main,
                "digest": digest,
                "files": files,
                "size_bytes": size,
                "created": time.time(),
                **record,
            }
            (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            target = self.entries / key
            try:
                os.rename(staging, target)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # a concurrent builder won; use its entry
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise CacheError(f"disk full while writing cache entry {key[:12]} under {self.root}") from e
            raise CacheError(f"cannot write cache entry {key[:12]} under {self.root}: {e}") from e
        return self.open(key, verify=False)

    def evict(self, key: str) -> None:
        """Remove an entry: renamed out of ``entries/`` first, so no reader sees it half-deleted."""
        src = self.entries / key
        if not src.exists():
            return
        trash = self.tmp / f"evicted.{key}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # -- listing and maintenance -------------------------------------------------------------
    def list(self) -> list[EntryInfo]:
        """Every committed entry, most recently used first."""
        out = []
        for d in self.entries.iterdir():
            info = self.lookup(d.name)
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda e: (e.path.stat().st_mtime if e.path.exists() else 0), reverse=True)

    def clear(self) -> int:
        """Remove every entry and stale staging dir; returns the number of entries removed."""
        n = 0
        for d in list(self.entries.iterdir()):
            self.evict(d.name)
            n += 1
        for d in list(self.tmp.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
        return n

    def verify_all(self) -> list[tuple[str, str]]:
        """Re-hash every entry. Returns ``[(key, problem)]`` for the corrupt ones (empty when healthy)."""
        bad = []
        for d in sorted(self.entries.iterdir()):
            try:
                self.open(d.name, verify=True)
            except CorruptEntryError as e:
                bad.append((d.name, str(e)))
        return bad

    def gc(self, max_bytes: int) -> list[str]:
        """Evict least-recently-used entries until the store holds at most ``max_bytes``; returns evicted keys."""
        entries = self.list()
        total = sum(e.size_bytes for e in entries)
        evicted = []
        for e in reversed(entries):
            if total <= max_bytes:
                break
            self.evict(e.key)
            total -= e.size_bytes
            evicted.append(e.key)
        return evicted
