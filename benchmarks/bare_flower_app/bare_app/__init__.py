"""Bare Flower App for the round-overhead floor (benchmarks/bench_rounds.py)."""
