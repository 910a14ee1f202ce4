"""Benchmarks: scripts that measure edgefl next to a peer or a physical floor.

Each ``bench_*.py`` module runs on its own (``python -m benchmarks.bench_inference
[--quick]``) and writes ``benchmarks/out/<name>.json`` plus a Markdown table;
``python -m benchmarks.run_all`` runs them all and rewrites ``benchmarks/RESULTS.md``.
They measure; they assert nothing.
"""
