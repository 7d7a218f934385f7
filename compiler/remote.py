"""A shared remote cache behind the local store, through fsspec (``s3://``, ``gs://``, ``file://``).

Layout under the remote URL (the two halves of Bazel's remote cache)::

    cas/<sha256[:2]>/<sha256>   every payload file, named by the sha256 of its bytes
    ac/<key>.json               the entry's record: the local ``meta.json``, byte for byte

Guarantees:

* **The record is the commit marker.** An upload writes every payload blob first and the
  record last (one ``PUT`` on object stores; a temporary name and a rename on ``file://``).
  A reader that finds no intact record sees no entry, so an interrupted upload leaves nothing
  a reader trusts.
* **Converging writers.** Blobs are content-addressed, so two machines uploading the same key
  write the same names for the same bytes; whichever record lands last names blobs that
  are all present. The key resolves to one complete entry either way.
* **Checked downloads.** A hit is downloaded into a local staging dir, every file is hashed
  and compared with the record, and only then renamed into the local store. A remote entry
  that fails its digests is refused (:class:`~accelc.errors.CorruptEntryError`), reported,
  rebuilt locally and uploaded again over the bad blobs; it never replaces a good local entry.
* **Credentials stay in the environment.** fsspec's backends read them as their SDKs do (for
  S3, botocore: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE`` ...). accelc records only :func:`display_url` (the URL without any user
  info), never an endpoint or a key.

fsspec (and s3fs / gcsfs for their schemes) are optional: ``pip install 'accelc[cluster]'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .artifacts import Artifact, file_digests
from .cache import META, EntryInfo, Store, meta_digest, safe_relative
from .errors import CacheError, CorruptEntryError

#: Environment variable naming the remote cache URL (``--cache-url`` overrides it).
URL_ENV_VAR = "ACCELC_CACHE_URL"
_HEX = frozenset("0123456789abcdef")


def display_url(url: str) -> str:
    """``url`` without user info (``s3://key:secret@bucket/x`` -> ``s3://bucket/x``) and query: what reports show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _is_sha256(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def check_record(key: str, meta: Any) -> str | None:
    """Why ``meta`` is not a trustworthy record of entry ``key`` (``None`` when it is)."""
    if not isinstance(meta, dict):
        return "the record is not a JSON object"
    if meta.get("key") != key:
        return "the record names another key"
    if meta.get("meta_sha256") != meta_digest(meta):
        return "the record does not match its own digest"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "the record lists no files"
    for name, digest in files.items():
        if not safe_relative(name) or name == META or not _is_sha256(digest):
            return f"the record lists a bad file {name!r}"
    return None


@dataclass(frozen=True)
class RemoteProblem:
    """One remote entry that failed ``verify``: its key and what is wrong."""

    key: str
    problem: str


class RemoteStore:
    """The remote half of the cache at ``url`` (any fsspec URL).

    Raises:
        CacheError: fsspec (or the scheme's backend, e.g. s3fs) is not installed, or the URL is unusable.
    """

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise CacheError(
                f"--cache-url {display_url(url)} needs fsspec: pip install 'accelc[cluster]'"
            ) from e
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise CacheError(f"remote cache {display_url(url)} is not usable: {e}") from e
        self.url = url
        self.root = root.rstrip("/")
        self.local_fs = "file" in _protocols(self.fs)
        if self.local_fs:
            self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"RemoteStore({display_url(self.url)!r})"

    # -- paths -------------------------------------------------------------------------------
    def record_path(self, key: str) -> str:
        return f"{self.root}/ac/{key}.json"

    def blob_path(self, digest: str) -> str:
        return f"{self.root}/cas/{digest[:2]}/{digest}"

    # -- reading -----------------------------------------------------------------------------
    def read_record(self, key: str) -> dict[str, Any] | None:
        """The entry's record if one is present and intact (its own digest checked), else ``None``."""
        try:
            raw = self.fs.cat_file(self.record_path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheError(f"cannot read remote cache {display_url(self.url)}: {e}") from e
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        return meta if check_record(key, meta) is None else None

    def keys(self) -> list[str]:
        """Every key with a record on the remote (intact or not), sorted."""
        try:
            names = self.fs.ls(f"{self.root}/ac", detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = str(n).rsplit("/", 1)[-1]
            if base.endswith(".json") and _is_sha256(base[: -len(".json")]):
                out.append(base[: -len(".json")])
        return sorted(out)

    def fetch(self, key: str, local: Store) -> EntryInfo | None:
        """Download entry ``key`` into ``local`` (staging, hash check, rename). ``None`` when the
        remote has no intact record of it.

        Raises:
            CorruptEntryError: a blob is missing or its bytes do not match the record; nothing is
                kept locally.
            CacheError: the remote cannot be read, or the local store cannot be written.
        """
        meta = self.read_record(key)
        if meta is None:
            return None
        staging = local.staging(key)
        try:
            for name, digest in sorted(meta["files"].items()):
                dst = staging / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self.blob_path(digest), str(dst))
                except FileNotFoundError as e:
                    raise CorruptEntryError(
                        f"remote cache entry {key[:12]} ({meta.get('node', '?')}) lacks its file {name}"
                    ) from e
            actual = file_digests(staging, exclude=(META,))
            if actual != meta["files"]:
                bad = sorted(n for n in set(actual) | set(meta["files"]) if actual.get(n) != meta["files"].get(n))
                raise CorruptEntryError(
                    f"remote cache entry {key[:12]} ({meta.get('node', '?')}) does not match its recorded "
                    f"digest: {', '.join(bad)} changed"
                )
            (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            install(local, key, staging)
        except OSError as e:
            raise CacheError(f"cannot download remote cache entry {key[:12]}: {e}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Store.lookup(local, key)

    # -- writing -----------------------------------------------------------------------------
    def push(self, key: str, local: Store, force: bool = False) -> bool:
        """Upload local entry ``key`` (its files re-hashed first): blobs, then the record.

        Without ``force`` an entry whose record is already intact on the remote is left alone,
        and blobs already present with the right size are not sent again. Returns whether
        anything was uploaded.

        Raises:
            CorruptEntryError: the local entry does not match its own digests (nothing is uploaded).
            CacheError: the remote cannot be written.
        """
        art = Store.open(local, key, verify=True, touch=False)  # the local entry, never a download
        meta = Store.lookup(local, key)
        if meta is None:  # pragma: no cover - evicted between the two reads
            return False
        if not force and self.read_record(key) is not None:
            return False
        try:
            for name, digest in sorted(meta.meta["files"].items()):
                self._put_blob(art.path / name, digest, force)
            self._put_record(key, (art.path / META).read_bytes())
        except OSError as e:
            raise CacheError(f"cannot upload cache entry {key[:12]} to {display_url(self.url)}: {e}") from e
        return True

    def _put_blob(self, src: Path, digest: str, force: bool) -> None:
        dst = self.blob_path(digest)
        if not force:
            try:
                if int(self.fs.info(dst)["size"]) == src.stat().st_size:
                    return
            except FileNotFoundError:
                pass
        self._put_atomic(str(src), dst)

    def _put_record(self, key: str, raw: bytes) -> None:
        dst = self.record_path(key)
        if self.local_fs:
            tmp = Path(dst).with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_bytes(raw)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self.fs.pipe_file(dst, raw)  # one PUT: the object is there whole or not at all

    def _put_atomic(self, src: str, dst: str) -> None:
        if self.local_fs:
            tmp = Path(dst).with_name(f".{Path(dst).name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self.fs.put_file(src, dst)

    # -- maintenance -------------------------------------------------------------------------
    def verify(self) -> tuple[int, list[RemoteProblem]]:
        """Re-hash every remote entry's blobs (streamed). Returns ``(entries checked, problems)``."""
        problems = []
        keys = self.keys()
        for key in keys:
            meta = self.read_record(key)
            if meta is None:
                problems.append(RemoteProblem(key, "its record is unreadable or does not match its own digest"))
                continue
            for name, digest in sorted(meta["files"].items()):
                try:
                    h = hashlib.sha256()
                    with self.fs.open(self.blob_path(digest), "rb") as f:
                        for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                            h.update(chunk)
                    if h.hexdigest() != digest:
                        problems.append(RemoteProblem(key, f"{name} does not match its recorded digest"))
                except FileNotFoundError:
                    problems.append(RemoteProblem(key, f"{name} is missing"))
        return len(keys), problems


def _protocols(fs: Any) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def install(local: Store, key: str, staging: Path) -> None:
    """Rename a verified staging dir (payload + ``meta.json``) into ``local`` as entry ``key``.

    An intact entry already there wins (the staging dir is discarded); a broken leftover is
    evicted first, as :meth:`Store.commit` does.
    """
    target = local.entries / key
    for attempt in range(2):
        try:
            os.rename(staging, target)
            return
        except OSError:
            if attempt == 0 and local.has_debris(key):
                local.evict(key)
                continue
            shutil.rmtree(staging, ignore_errors=True)
            return


class TieredStore(Store):
    """The local store with a :class:`RemoteStore` behind it.

    ``lookup`` tries the local store, then downloads a remote hit (checked); ``commit`` uploads
    after the local commit; a local hit that the remote lacks is uploaded too (``push_hits``),
    so machines that share the remote can read every entry a build used. A remote that
    cannot be reached or written is reported through ``notice`` and the build goes on with
    the local store. With ``download=False`` (``accelc plan``) a remote hit is reported
    without downloading it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        remote: RemoteStore,
        notice: Callable[[str], None] | None = None,
        download: bool = True,
        push_hits: bool = True,
    ):
        super().__init__(root)
        self.remote = remote
        self.notice = notice or (lambda _m: None)
        self.download = download
        self.push_hits = push_hits
        #: keys whose remote entry was refused: the rebuilt entry is uploaded over it.
        self.refused: set[str] = set()
        self._pushed: set[str] = set()
        self.stats = {"remote_hits": 0, "uploads": 0, "refused": 0}

    # Maintenance sees the local store only (no downloads, no uploads).
    def has_debris(self, key: str) -> bool:
        return os.path.lexists(self.entries / key) and Store.lookup(self, key) is None

    def list(self) -> list[EntryInfo]:
        return Store(self.root).list()

    def verify_all(self) -> list[tuple[str, str]]:
        return Store(self.root).verify_all()

    def sweep(self) -> list[str]:
        return Store(self.root).sweep()

    def gc(self, max_bytes: int, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        return Store(self.root).gc(max_bytes, keep)

    def lookup(self, key: str) -> EntryInfo | None:
        """Local entry, else the remote's (downloaded and checked unless ``download`` is off)."""
        info = super().lookup(key)
        if info is not None:
            if self.push_hits and key not in self._pushed:
                self._push(key, force=False)
            return info
        if key in self.refused:
            return None
        try:
            if not self.download:
                meta = self.remote.read_record(key)
                return None if meta is None else EntryInfo(key, meta, self.entries / key)
            if self.has_debris(key):
                return None  # the executor reports and evicts it under the lock, then we are asked again
            info = self.remote.fetch(key, self)
        except CorruptEntryError as e:
            self.refused.add(key)
            self.stats["refused"] += 1
            self.notice(f"{e}; refused, rebuilding it")
            return None
        except CacheError as e:
            self.notice(f"{e}; going on without the remote cache for this entry")
            return None
        if info is not None:
            self.stats["remote_hits"] += 1
            self._pushed.add(key)
        return info

    def open(self, key: str, verify: bool = True, touch: bool = True) -> Artifact:
        """As :meth:`Store.open`, after fetching the entry from the remote when it is not local."""
        if super().lookup(key) is None:
            self.lookup(key)
        return super().open(key, verify=verify, touch=touch)

    def commit(self, key: str, staging: Path, kind: str, main: str, record: dict[str, Any]) -> Artifact:
        """As :meth:`Store.commit`, then upload the entry (over the remote's if it was refused)."""
        art = super().commit(key, staging, kind, main, record)
        self._push(key, force=key in self.refused)
        self.refused.discard(key)
        return art

    def _push(self, key: str, force: bool) -> None:
        self._pushed.add(key)
        try:
            if self.remote.push(key, self, force=force):
                self.stats["uploads"] += 1
        except (CacheError, CorruptEntryError) as e:
            self.notice(f"{e}; the entry stays in the local cache only")


def open_store(
    cache_dir: str | os.PathLike[str],
    cache_url: str | None,
    notice: Callable[[str], None] | None = None,
    download: bool = True,
) -> Store:
    """The local store at ``cache_dir``, tiered over ``cache_url`` when one is given (``None``: local only)."""
    if not cache_url:
        return Store(cache_dir)
    return TieredStore(cache_dir, RemoteStore(cache_url), notice=notice, download=download, push_hits=download)
