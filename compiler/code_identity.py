"""What code a node runs, for its cache key: the transitive closure of the modules it imports.

A ``python`` model source and every pass are keyed on the code that actually runs, not only
on the file that defines the callable or the pass class: editing a helper module that the
model's module imports (a sibling file, a sub-package), or a module of accelc that a pass
imports (``passes/sensitivity.py``, ``compiler/runners.py``), changes the key of every node
that runs it; editing a module it does not import changes nothing.

How the closure is found. Each module's source is parsed with :mod:`ast` and every ``import``
statement in it (also those inside functions: lazy imports run too) is resolved to a file
with :class:`importlib.machinery.PathFinder`, walking packages through their
``submodule_search_locations``. Nothing is imported or executed to find the closure (unlike
``importlib.util.find_spec("a.b")``, which imports ``a``; and unlike :mod:`modulefinder`,
which would also descend into torch and every other installed package). Modules are then:

* followed (hashed and their imports read): local modules (not under ``site-packages`` /
  ``dist-packages``), and installed modules of the packages named in ``follow`` (accelc's own
  package and a plugin's package, for passes);
* recorded by version only: other installed modules, as the version of the distribution that
  ships them (:func:`importlib.metadata.packages_distributions`);
* ignored: the standard library and built-in modules (the Python version is in the
  environment fingerprint).

An import that resolves to nothing (an optional dependency, an attribute imported with
``from x import name``) is skipped. Code reached only through ``importlib.import_module`` of a
computed name, ``exec`` or a plugin entry point is not seen; such code should live in a
module that is imported by name.

Speed: a warm build computes every key. Each file's sha256 is cached per process on its
``(mtime_ns, size, inode)``; its import list, a pure function of its bytes, is cached by that
sha256, in memory and in ``code-imports.json`` under the cache root (:func:`use_import_cache`),
so a warm ``accelc build`` hashes the closure's files but parses none of them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import sha256_file

_INSTALLED_DIRS = ("site-packages", "dist-packages")
#: Most file digests kept in ``code-imports.json`` (old versions of edited files age out).
MAX_IMPORT_CACHE = 4096


@dataclass(frozen=True)
class CodeClosure:
    """The modules a piece of code runs: ``modules`` maps module name -> sha256 of its source
    file, ``distributions`` maps distribution name -> version for installed packages it imports."""

    modules: dict[str, str]
    distributions: dict[str, str]

    def digest(self) -> str:
        """One sha256 over both maps (canonical JSON; independent of where the files live)."""
        doc = {"modules": self.modules, "distributions": self.distributions}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


Imports = tuple[tuple[int, str, tuple[str, ...]], ...]
_DIGESTS: dict[str, tuple[tuple[int, int, int], str]] = {}
_IMPORTS: dict[str, Imports] = {}
_FIRST: dict[str, str] = {}  # path -> the digest this process first saw
_DISK: dict[str, Any] = {"path": None, "dirty": False}


def use_import_cache(path: Path) -> None:
    """Read (once per path) and later extend the on-disk import-list cache at ``path``.
    An unreadable or malformed file is ignored: import lists are recomputed from the sources."""
    if _DISK["path"] == path:
        return
    _DISK.update(path=path, dirty=False)
    try:
        doc = json.loads(path.read_text())
        for digest, imports in doc.items():
            _IMPORTS.setdefault(digest, tuple((int(lv), str(m), tuple(map(str, ns))) for lv, m, ns in imports))
    except (OSError, ValueError, TypeError):
        pass


def flush_import_cache() -> None:
    """Write the import-list cache back (atomically) if anything was added; errors are ignored."""
    path = _DISK["path"]
    if path is None or not _DISK["dirty"]:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    used = {d for _, d in _DIGESTS.values()}  # this process's files first, then older ones up to the cap
    keep = [*(k for k in _IMPORTS if k in used), *(k for k in _IMPORTS if k not in used)][:MAX_IMPORT_CACHE]
    try:
        tmp.write_text(json.dumps({k: [list(i) for i in _IMPORTS[k]] for k in keep}))
        os.replace(tmp, path)
        _DISK["dirty"] = False
    except OSError:
        tmp.unlink(missing_ok=True)


def _file_facts(path: str) -> tuple[str, Imports]:
    """``(sha256, imports)`` of a source file. ``imports`` are ``(level, module, names)`` for every
    import statement (``import a.b`` -> ``(0, "a.b", ())``)."""
    key = _stat_key(path)
    hit = _DIGESTS.get(path)
    digest = hit[1] if hit is not None and key is not None and hit[0] == key else sha256_file(path)
    if key is not None:
        _DIGESTS[path] = (key, digest)
    _FIRST.setdefault(path, digest)
    if digest in _IMPORTS:
        return digest, _IMPORTS[digest]
    imports: list[tuple[int, str, tuple[str, ...]]] = []
    if path.endswith(".py"):
        try:
            tree = ast.parse(Path(path).read_bytes(), filename=path)
        except (SyntaxError, ValueError):
            tree = None  # the import fails at run time; its bytes are still in the key
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                imports += [(0, a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imports.append((node.level, node.module or "", tuple(a.name for a in node.names if a.name != "*")))
    _IMPORTS[digest] = tuple(imports)
    _DISK["dirty"] = True
    return digest, _IMPORTS[digest]


def _installed_fingerprint() -> str:
    """sha256 over the ``*.dist-info`` / ``*.egg-info`` names (name and version) in every directory
    on ``sys.path``: it changes whenever a distribution is installed, removed or upgraded."""
    h = hashlib.sha256()
    for entry in sys.path:
        try:
            names = sorted(n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info")))
        except OSError:  # not a directory (a zip), or gone
            continue
        h.update(f"{entry}\0{len(names)}\0".encode())
        for n in names:
            h.update(n.encode() + b"\0")
    return h.hexdigest()


@functools.cache
def _all_distributions() -> dict[str, tuple[str, ...]]:
    """:func:`importlib.metadata.packages_distributions`, which reads every installed RECORD
    (about 2-4 s in an environment with torch, ray and the CUDA wheels), cached on disk beside the
    import-list cache and keyed by :func:`_installed_fingerprint`, so a warm build pays it once per
    change of the environment, not once per process."""
    fingerprint = _installed_fingerprint()
    disk = _DISK["path"].with_name("code-distributions.json") if _DISK["path"] is not None else None
    if disk is not None:
        try:
            doc = json.loads(disk.read_text())
            if doc.get("fingerprint") == fingerprint:
                return {str(k): tuple(map(str, v)) for k, v in doc["packages"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    found = {k: tuple(v) for k, v in importlib.metadata.packages_distributions().items()}
    if disk is not None:
        tmp = disk.with_name(f".{disk.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "packages": found}))
            os.replace(tmp, disk)
        except OSError:
            tmp.unlink(missing_ok=True)
    return found


@functools.cache
def _distributions_of(top: str) -> tuple[str, ...]:
    """Distributions that ship top-level package ``top``. A distribution named like the package
    (``torch``, ``onnx``) is looked up directly; only other names (``PIL`` -> ``pillow``) pay for
    :func:`importlib.metadata.packages_distributions`, which reads every installed RECORD."""
    for name in dict.fromkeys((top, top.replace("_", "-"))):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        tops = (dist.read_text("top_level.txt") or top).split()
        if top in tops:
            return (dist.metadata["Name"],)
    return _all_distributions().get(top, ())


@functools.cache
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _is_installed(origin: str) -> bool:
    return any(part in _INSTALLED_DIRS for part in Path(origin).parts)


def find_module(name: str, search: Iterable[str] = ()) -> importlib.machinery.ModuleSpec | None:
    """The spec of module ``name`` without importing anything; ``search`` is tried before ``sys.path``.

    An already-imported module answers with its own spec; a sub-module is looked up in its
    parent package's ``submodule_search_locations``. Returns ``None`` when nothing is found.
    """
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None) if mod is not None else None
    if spec is not None and (spec.origin or spec.submodule_search_locations):
        return spec
    parent, _, leaf = name.rpartition(".")
    try:
        if not parent:
            spec = importlib.machinery.PathFinder.find_spec(name, [*search, *sys.path])
            if spec is None:
                spec = importlib.util.find_spec(name)  # editable-install finders; a top-level lookup imports nothing
            return spec
        up = find_module(parent, search)
        if up is None or not up.submodule_search_locations:
            return None
        return importlib.machinery.PathFinder.find_spec(name, list(up.submodule_search_locations))
    except (ImportError, ValueError, AttributeError):
        return None


def _candidates(current: str, is_package: bool, level: int, module: str, names: tuple[str, ...]) -> list[str]:
    """Module names an import statement may load (its parents run too: ``import a.b`` runs ``a``)."""
    if level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (level - 1)] if level > 1 else base
        if not base:
            return []
        target = ".".join([*base, module] if module else base)
    else:
        target = module
    if not target:
        return []
    parts = target.split(".")
    out = [".".join(parts[: i + 1]) for i in range(len(parts))]
    out += [f"{target}.{n}" for n in names]
    return out


def code_closure(root: str, search: Iterable[str] = (), follow: Iterable[str] = ()) -> CodeClosure:
    """The closure of module ``root``: every module it runs, hashed or versioned (see the module docstring).

    ``search``: directories looked in before ``sys.path`` (a recipe's ``model.path``). ``follow``:
    top-level package names whose installed modules are followed and hashed like local ones.
    The root module itself is always hashed (and versioned if installed).

    Raises:
        ModuleNotFoundError: ``root`` cannot be found.
    """
    search = tuple(search)
    follow_tops = set(follow)
    modules: dict[str, str] = {}
    dists: dict[str, str] = {}
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".", 1)[0]
        if name != root and (_is_stdlib(top) or name == "__main__"):
            continue
        spec = find_module(name, search)
        if spec is None:
            if name == root:
                raise ModuleNotFoundError(f"module '{root}' not found")
            continue
        origin = spec.origin if spec.has_location and spec.origin and os.path.isfile(spec.origin) else None
        installed = origin is not None and _is_installed(origin)
        if installed or origin is None:
            for dist in _distributions_of(top):
                version = _version(dist)
                if version is not None:
                    dists[dist] = version
        if origin is None or (installed and name != root and top not in follow_tops):
            continue  # a namespace package or a built-in; or an installed package recorded by version
        digest, imports = _file_facts(origin)
        modules[name] = digest
        is_package = spec.submodule_search_locations is not None
        for level, module, names in imports:
            todo += _candidates(name, is_package, level, module, names)
    return CodeClosure(dict(sorted(modules.items())), dict(sorted(dists.items())))


def changed_since_first_seen(modules: Iterable[str]) -> list[str]:
    """Modules of ``modules`` already imported in this process whose source file changed since
    this process first hashed it: the code Python would run (the imported copy) is not the code
    the key describes. Used to refuse building from stale imports in a long-running process."""
    out = []
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path and path in _FIRST and os.path.isfile(path) and _file_facts(path)[0] != _FIRST[path]:
            out.append(name)
    return out
