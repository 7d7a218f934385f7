"""Benchmarks that compare accelc's artifacts with what a user would otherwise deploy.

Run ``python -m benchmarks.compare --help`` from the repository root; see ``benchmarks/README.md``.
"""
