"""Built-in passes, one module per pass family. They register through
:mod:`accelc.plugins.builtin`, the same hook third-party plugins use."""
