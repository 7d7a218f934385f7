"""accelc: a declarative, plugin-based optimization compiler for PyTorch models.

``accelc build RECIPE.yaml`` validates a YAML recipe, lowers it into a typed pass
graph for the chosen target, runs each pass once (artifacts are cached by content
hash), verifies accuracy against the source model and benchmarks the result.
Library entry points: :func:`accelc.build.build` and :func:`accelc.build.plan`.
"""

__version__ = "0.1.0"
