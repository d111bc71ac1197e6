"""Helpers behind `python -m sglx.bench_serving`: datasets, request backends, arrival process, metrics."""


class BenchError(Exception):
    """A user-facing failure (bad flag, unreachable server, missing file): printed as one line, no traceback."""
