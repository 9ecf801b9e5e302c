"""Benchmarks: vanilla and filtered in the same process, alternating, reported as ratios."""
