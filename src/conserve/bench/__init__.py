"""`conserve bench`: load generators for OpenAI-compatible servers (HTTP clients only: no torch here).

`run_benchmark(BenchConfig(...))` runs one benchmark in-process and returns the report dict that
`conserve bench serve --output` writes.
"""

from conserve.bench.config import BenchConfig
from conserve.bench.runner import run_benchmark

__all__ = ["BenchConfig", "run_benchmark"]
