"""Benchmarks of rlora_kernels: optimizer step, training step, convergence and scaling.

Run them all with `python -m benchmarks [--quick] [--only NAME,...] [--out DIR]`, one alone
with `python -m benchmarks.bench_<name> [--quick] [--out DIR]`, or through pytest-benchmark
with `pytest benchmarks/`.
"""
