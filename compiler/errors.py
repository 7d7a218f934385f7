"""Every error accelc raises on purpose derives from :class:`AccelcError`.

The CLI prints an ``AccelcError`` as a one-paragraph message and exits non-zero
(exit codes below); anything else is a bug and is shown with its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class AccelcError(Exception):
    """Base class of the errors accelc reports to users.

    ``exit_code`` is what ``accelc`` exits with when this error ends a command.
    """

    exit_code = 1


@dataclass(frozen=True)
class SchemaIssue:
    """One validation problem: ``where`` is a JSON path such as ``passes[3].calibrate.method``."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class RecipeError(AccelcError):
    """The recipe file cannot be read, parsed or validated.

    ``issues`` holds every problem found (validation reports them all at once),
    each naming its JSON path.
    """

    exit_code = 2

    def __init__(self, file: str, issues: list[SchemaIssue] | str):
        if isinstance(issues, str):
            issues = [SchemaIssue("(file)", issues)]
        self.file = file
        self.issues = issues
        lines = [f"{file}: {len(issues)} problem(s) in the recipe"]
        lines += [f"  - {i}" for i in issues]
        super().__init__("\n".join(lines))


class GraphError(AccelcError):
    """The lowered pass graph is inconsistent (unknown pass, missing input kind, ...)."""

    exit_code = 2


class CapabilityError(AccelcError):
    """A pass needs a host capability (``cuda``, ``tensorrt``, ``sm>=75``) this host lacks."""

    exit_code = 3

    def __init__(self, node: str, missing: list[str], detail: str = ""):
        self.node = node
        self.missing = missing
        msg = f"pass '{node}' cannot run on this host: missing {', '.join(missing)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class PassError(AccelcError):
    """A pass failed while running. The message names the pass (and plugin, for third-party passes)."""

    exit_code = 4


class VerificationError(AccelcError):
    """A verify stage measured a metric outside the recipe's tolerance."""

    exit_code = 5


class CacheError(AccelcError):
    """The artifact store is unusable (unwritable directory, disk full, ...)."""

    exit_code = 6


class CorruptEntryError(CacheError):
    """A cache entry's bytes do not match the digest recorded when it was written."""


class DataError(AccelcError):
    """Calibration or validation data cannot be read (missing folder, undecodable image, ...)."""

    exit_code = 2


class ModelSourceError(AccelcError):
    """The model cannot be built or its weights cannot be loaded."""

    exit_code = 2


class OutDirError(AccelcError):
    """The out dir cannot be used: it is a filesystem root or the home directory, or it holds
    files accelc did not write at names a build would publish (``--force`` replaces them)."""

    exit_code = 2


class BuildTimeoutError(PassError):
    """User code (a model source's ``load``) did not return within the build's time limit."""


class LockTimeoutError(CacheError):
    """Waiting for another build's lock on a cache key took longer than the build's lock timeout."""


#: Longest echo of a user's value in an error message (a 1 MB recipe name is not repeated in full).
MAX_ECHO = 80


def cut(value: object, limit: int = MAX_ECHO) -> str:
    """``str(value)``, cut to ``limit`` characters with a note of how long it was."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text)} characters)"


class PluginError(AccelcError):
    """A plugin failed to load or returned something that breaks the plugin contract."""

    exit_code = 2


class RuntimeLoadError(AccelcError):
    """``runtime.json`` is invalid, the model cannot be loaded or captured, or a call does not
    match a captured shape."""

    exit_code = 4
