"""``accelc.runtime.load(OUT_DIR)``: load what a build deployed, through the runtime plugin that owns it.

A runtime plugin that can load an out dir registers a :class:`accelc.runners.Runtime` with a
``config_file`` (the file its builds write next to the model, e.g. ``runtime.json`` for
CUDA graphs) and a ``load`` function; :func:`load` finds the runtime whose ``config_file``
is in the out dir and calls it. The core knows no runtime itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RuntimeLoadError

__all__ = ["RuntimeLoadError", "load"]


def load(directory: str | Path, **options: Any) -> Any:
    """Load the runtime a build wrote into ``directory`` (its out dir); ``options`` go to the
    runtime's loader (the CUDA-graph runtime takes ``device`` and ``capture``).

    Raises:
        RuntimeLoadError: no registered runtime's config file is in ``directory``, or the
            runtime's loader fails (it says why: invalid config, no CUDA device, ...).
    """
    from .registry import default_registry

    d = Path(directory)
    runtimes = [rt for rt in default_registry().runtimes.values() if rt.load is not None and rt.config_file]
    for rt in runtimes:
        if (d / rt.config_file).is_file():
            return rt.load(d, **options)
    files = ", ".join(sorted({rt.config_file for rt in runtimes})) or "none registered"
    raise RuntimeLoadError(f"{d}: not found: {files} (the file a runtime's build writes into its out dir)")
