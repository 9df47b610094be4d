"""Speed and memory benchmarks, each against a baseline measured in the same run.

Run them from the repository root as modules, e.g. ``python -m benchmarks.score_speed --help``.
"""
