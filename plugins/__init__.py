"""accelc's plugin system: hook specifications, the plugin manager and the built-in plugins.

Third-party plugins declare an entry point in the group ``accelc.plugins`` whose value
is a module (or object) with ``@hookimpl`` functions; see :mod:`accelc.plugins.hookspecs`.
"""

from .hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
