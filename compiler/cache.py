"""The content-addressed artifact store.

Layout under the store root (default: the user cache dir, ``$ACCELC_CACHE_DIR`` or
``--cache-dir`` override it)::

    entries/<key>/meta.json    kind, primary file, per-file sha256, tree digest, metrics,
                               and ``meta_sha256``, a digest of meta.json's own content
    entries/<key>/<payload>    the files the pass wrote
    tmp/<key>.<random>/        staging while a pass runs (never trusted)
    tmp/<key>.<random>.scratch/  a running pass's temporary files (calibration, trials)
    scratch/<kind>-<pid>-<random>/  a build's private space (``--no-cache`` store), held by
                               ``scratch/<name>.lock`` while in use
    locks/<key>.lock           one builder per key at a time

Guarantees:

* **Atomic writes.** A pass writes into a staging dir; ``commit`` hashes the files,
  writes ``meta.json`` last and renames the dir into ``entries/`` in one ``rename``.
  An interrupted build (SIGINT, SIGKILL, power loss before the rename) leaves only
  staging dirs, which nothing reads; ``gc`` removes the orphaned ones.
* **One builder per key.** ``lock(key)`` is a ``filelock`` lock (``flock``, released by
  the kernel when its holder dies); a second build of the same key waits, then finds
  the entry and reuses it.
* **Checked reads.** ``lookup`` trusts ``meta.json`` only when its own digest matches;
  ``open(key)`` also re-hashes every payload file and compares with ``meta.json``; a
  mismatch raises :class:`CorruptEntryError` and the executor evicts and rebuilds the entry.
* **Bounded size.** ``gc(max_bytes)`` evicts least-recently-used entries (use = a build
  looked the entry up or opened it; ``verify_all`` and ``list`` do not count).
* **Real entries only.** An entry is a real directory inside ``entries/``; one replaced by a
  symlink (to a copy elsewhere, say) is not trusted, ``verify_all`` reports it and a build
  rebuilds it.
* **Reclaimed scratch space.** Scratch directories live under the root and are swept by
  ``sweep``/``gc`` once their owner's lock is free (the owner finished or was killed);
  lock files of keys with no entry and no builder are removed too, so ``locks/`` does not
  only grow.
* **Full disk.** A write that fails with ``ENOSPC`` raises :class:`CacheError` saying so,
  and the half-written staging dir is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout

from .artifacts import Artifact, file_digests, tree_digest
from .errors import CacheError, CorruptEntryError, cut

META = "meta.json"
ENV_VAR = "ACCELC_CACHE_DIR"
#: Environment variable holding the store's size limit in MiB (``accelc cache gc`` and builds honour it).
MAX_SIZE_ENV_VAR = "ACCELC_CACHE_MAX_MIB"
#: Default limit (seconds) on waiting for another build's lock on one cache key: longer than the
#: slowest pass accelc runs (a TensorRT engine build or an accuracy-aware INT8 search).
DEFAULT_LOCK_TIMEOUT_S = 7200.0
#: ``errno`` values that mean "no space left" (disk full, or the user's quota is spent).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def default_root() -> Path:
    """``$ACCELC_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("accelc")``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    import platformdirs

    return Path(platformdirs.user_cache_dir("accelc"))


class SizeLimitError(CacheError):
    """A size limit that is not a finite number of MiB >= 0 (``nan``, ``inf``, ``-1``, ``lots``): bad input."""

    exit_code = 2


def parse_size_mib(text: str, what: str = MAX_SIZE_ENV_VAR) -> int:
    """Bytes for a size in MiB written as ``text`` (a finite number >= 0).

    Raises:
        SizeLimitError: naming ``what`` and the (cut) value.
    """
    try:
        mib = float(text)
    except (TypeError, ValueError):
        mib = -1.0
    if not (math.isfinite(mib) and mib >= 0):
        raise SizeLimitError(f"{what}={cut(repr(text))}: expected a size in MiB (a finite number >= 0)")
    return int(mib * 2**20)


def size_limit_from_env() -> int | None:
    """The size limit in bytes from ``$ACCELC_CACHE_MAX_MIB``, or ``None`` when unset.

    Raises:
        SizeLimitError: the variable is set but is not a finite number >= 0 (exit 2).
    """
    text = os.environ.get(MAX_SIZE_ENV_VAR, "").strip()
    if not text:
        return None
    return parse_size_mib(text)


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is an ``OSError`` meaning the disk is full."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in NO_SPACE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its ``meta_sha256`` field, over canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a relative path that stays inside its directory (no ``..``, not absolute)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _real_dir(path: Path) -> bool:
    """A directory, not a symlink to one."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class EntryInfo:
    """What ``meta.json`` says about an entry (its own digest checked, payload files not re-hashed)."""

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
        self.scratch_root = self.root / "scratch"
        try:
            for d in (self.entries, self.tmp, self.locks, self.scratch_root):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cache directory {self.root} is not usable: {e.strerror or e}") from e

    # -- reading -----------------------------------------------------------------------------
    def lookup(self, key: str) -> EntryInfo | None:
        """The entry's metadata if a committed entry with an intact ``meta.json`` exists.

        Payload files are not re-hashed here (``open`` does that); ``meta.json`` itself is
        checked against the digest it carries, so changed metrics or digests are not trusted.
        """
        path = self.entries / key
        if not _real_dir(path):
            return None  # a symlink (or anything but a directory) is never an entry
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("meta_sha256") != meta_digest(meta):
            return None
        return EntryInfo(key, meta, path)

    def has_debris(self, key: str) -> bool:
        """Whether ``entries/<key>`` exists but is not a readable entry (its ``meta.json`` is gone or changed)."""
        return os.path.lexists(self.entries / key) and self.lookup(key) is None

    def open(self, key: str, verify: bool = True, touch: bool = True) -> Artifact:
        """The entry as an :class:`Artifact`, after checking every file against its recorded sha256.

        ``touch`` records the use for least-recently-used eviction.

        Raises:
            CorruptEntryError: the entry is missing files, has extra or changed bytes, or bad metadata.
        """
        info = self.lookup(key)
        if info is None:
            if (self.entries / key).is_symlink():
                raise CorruptEntryError(
                    f"cache entry {key[:12]} is a symlink to {cut(os.readlink(self.entries / key))}, "
                    "not a directory inside the store; it is not trusted"
                )
            raise CorruptEntryError(f"cache entry {key[:12]} has no readable {META}")
        meta = info.meta
        if verify:
            try:
                actual = file_digests(info.path, exclude=(META,))
            except OSError as e:  # a file vanished or became unreadable while hashing
                raise CorruptEntryError(f"cache entry {key[:12]} ({meta.get('node', '?')}) cannot be read: {e}") from e
            expected = meta.get("files", {})
            links = [p.name for p in info.path.rglob("*") if p.is_symlink()]
            if actual != expected or links:
                changed = sorted(
                    set(k for k in expected if actual.get(k) != expected[k])
                    | (set(actual) - set(expected))
                    | set(links)
                )
                raise CorruptEntryError(
                    f"cache entry {key[:12]} ({meta.get('node', '?')}) does not match its recorded digest: "
                    f"{', '.join(changed) or 'files'} changed or missing"
                )
        if touch:
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
        """An inter-process lock for building ``key``. Not re-entrant across lock objects:
        a process must not take the same key's lock twice."""
        return FileLock(str(self.locks / f"{key}.lock"), timeout=timeout)

    def staging(self, key: str) -> Path:
        """A fresh, empty staging dir for building ``key``.

        Raises:
            CacheError: the directory cannot be created (disk full, read-only store).
        """
        d = self.tmp / f"{key}.{uuid.uuid4().hex[:8]}"
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise self._write_error(key, e) from e
        return d

    @contextmanager
    def scratch(self, kind: str) -> Iterator[Path]:
        """A private directory ``scratch/<kind>-<pid>-<random>/`` for the duration of the block.

        Its lock (``scratch/<name>.lock``) is held while the block runs; the directory is removed
        when it ends, and :meth:`sweep` removes one whose owner was killed (its lock is free).

        Raises:
            CacheError: the directory cannot be created.
        """
        name = f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d = self.scratch_root / name
        lock = FileLock(str(self.scratch_root / f"{name}.lock"))
        try:
            with lock:
                d.mkdir()
                try:
                    yield d
                finally:
                    shutil.rmtree(d, ignore_errors=True)
        finally:
            Path(lock.lock_file).unlink(missing_ok=True)

    def pass_scratch(self, staging: Path) -> Path:
        """A scratch dir beside a staging dir (``tmp/<key>.<random>.scratch/``) for a pass's temporary
        files: swept like the staging dir once the key's lock is free. The caller removes it."""
        d = staging.with_name(f"{staging.name}.scratch")
        d.mkdir(exist_ok=True)
        return d

    def _write_error(self, key: str, e: OSError) -> CacheError:
        if e.errno in NO_SPACE:
            return CacheError(
                f"disk full while writing cache entry {key[:12]} under {self.root}; nothing of it was kept. "
                "Free space (e.g. `accelc cache gc --max-size MIB`) and build again"
            )
        return CacheError(f"cannot write cache entry {key[:12]} under {self.root}: {e}")

    def commit(self, key: str, staging: Path, kind: str, main: str, record: dict[str, Any]) -> Artifact:
        """Seal ``staging`` as entry ``key`` (hash files, write meta.json, rename into place).

        If another process committed ``key`` meanwhile, its entry wins and ``staging`` is
        discarded. A broken leftover at ``entries/<key>`` (no readable meta.json) is replaced;
        callers hold ``lock(key)``, so nobody else is writing it.

        Raises:
            CacheError: ``main`` is not a file inside ``staging``, the output holds a symlink or
                special file, or the disk filled up / the store is not writable; ``staging`` is removed.
        """
        try:
            if not safe_relative(main) or not (staging / main).is_file() or (staging / main).is_symlink():
                raise CacheError(f"pass output has no primary file '{main}' in {staging}")
            for p in staging.rglob("*"):
                mode = p.lstat().st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise CacheError(
                        f"pass output {p.relative_to(staging)} is a symlink or special file; "
                        "artifacts hold regular files only"
                    )
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
            meta = json.loads(json.dumps(meta, default=str))  # what will be read back
            meta["meta_sha256"] = meta_digest(meta)
            (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            target = self.entries / key
            for attempt in range(2):
                try:
                    os.rename(staging, target)
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise
                    if attempt == 0 and self.has_debris(key):
                        self.evict(key)  # a broken leftover, not a concurrent builder's entry
                        continue
                    shutil.rmtree(staging, ignore_errors=True)  # a concurrent builder won; use its entry
                    break
        except CacheError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._write_error(key, e) from e
        return self.open(key, verify=False)

    def evict(self, key: str) -> None:
        """Remove an entry: renamed out of ``entries/`` first, so no reader sees it half-deleted."""
        src = self.entries / key
        if not os.path.lexists(src):
            return
        trash = self.tmp / f"evicted.{key}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, trash)
        except OSError:
            return
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def _drop_lock_file(self, path: Path) -> bool:
        """Remove a lock file nobody holds (tried without waiting); it is unlinked while held. A
        process that opened it just before and then gets the flock sees an unlinked inode and
        retries on the path (filelock checks ``st_nlink``), so mutual exclusion holds."""
        lock = FileLock(str(path), timeout=0)
        try:
            with lock:
                path.unlink(missing_ok=True)
        except Timeout:
            return False
        except OSError:
            return False
        return True

    # -- listing and maintenance -------------------------------------------------------------
    def list(self) -> list[EntryInfo]:
        """Every committed entry, most recently used first (listing does not count as use)."""
        out = []
        for d in self.entries.iterdir():
            info = self.lookup(d.name)
            if info is None:
                continue
            try:
                used = info.path.stat().st_mtime
            except OSError:  # evicted meanwhile
                continue
            out.append((used, info))
        return [info for _, info in sorted(out, key=lambda t: t[0], reverse=True)]

    def clear(self) -> int:
        """Remove every entry and stale staging dir (a running builder's staging dir is left
        to it); returns the number of entries removed."""
        n = 0
        for d in list(self.entries.iterdir()):
            self.evict(d.name)
            n += 1
        self.sweep()
        return n

    def verify_all(self) -> list[tuple[str, str]]:
        """Re-hash every entry. Returns ``[(key, problem)]`` for the corrupt ones (empty when healthy).

        Checking is not use: entries keep their least-recently-used order.
        """
        bad = []
        for d in sorted(self.entries.iterdir()):
            try:
                self.open(d.name, verify=True, touch=False)
            except CorruptEntryError as e:
                bad.append((d.name, str(e)))
        return bad

    def total_bytes(self) -> int:
        """Payload bytes of every readable entry, as recorded in their ``meta.json``."""
        return sum(e.size_bytes for e in self.list())

    def sweep(self) -> list[str]:
        """Remove debris: entry dirs without a readable ``meta.json`` and staging dirs no live
        builder holds (left by a killed build). Returns the removed names."""
        removed = []
        for d in list(self.entries.iterdir()):
            if self.has_debris(d.name):
                self.evict(d.name)
                removed.append(f"entries/{d.name}")
        for d in list(self.tmp.iterdir()):
            key = d.name.split(".", 1)[0]
            if d.name.startswith("evicted."):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"tmp/{d.name}")
                continue
            try:
                with self.lock(key, timeout=0):  # held only while a builder is writing this staging dir
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"tmp/{d.name}")
            except Timeout:
                pass
        for d in list(self.scratch_root.iterdir()):
            if d.suffix == ".lock":
                continue
            lock_path = self.scratch_root / f"{d.name}.lock"
            try:
                with FileLock(str(lock_path), timeout=0):  # held by a live owner
                    if d.is_dir() and not d.is_symlink():
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        d.unlink(missing_ok=True)
                    removed.append(f"scratch/{d.name}")
                lock_path.unlink(missing_ok=True)
            except Timeout:
                pass
        for p in list(self.scratch_root.glob("*.lock")):
            if not os.path.lexists(p.with_suffix("")) and self._drop_lock_file(p):
                removed.append(f"scratch/{p.name}")
        staged = {d.name.split(".", 1)[0] for d in self.tmp.iterdir()}
        for p in list(self.locks.glob("*.lock")):
            key = p.name[: -len(".lock")]
            if key not in staged and not os.path.lexists(self.entries / key) and self._drop_lock_file(p):
                removed.append(f"locks/{p.name}")
        return removed

    def gc(self, max_bytes: int, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove debris (see :meth:`sweep`), then evict least-recently-used entries until the
        store holds at most ``max_bytes``. Entries in ``keep`` are never evicted (a build keeps
        what it just used). Returns the evicted keys."""
        self.sweep()
        entries = self.list()
        total = sum(e.size_bytes for e in entries)
        evicted = []
        for e in reversed(entries):
            if total <= max_bytes:
                break
            if e.key in keep:
                continue
            self.evict(e.key)
            self._drop_lock_file(self.locks / f"{e.key}.lock")
            total -= e.size_bytes
            evicted.append(e.key)
        return evicted
