"""Running many small S3 and DynamoDB calls side by side so that a 5,000-object batch fits a function's time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from botocore.config import Config

Item = TypeVar("Item")
Result = TypeVar("Result")

# Each call waits on the network, not the CPU: 32 in flight take 5,000 DynamoDB writes from ~25 s one by one
# (about 5 ms each) to about a second, and 5,000 S3 copies (50-100 ms each) from minutes to ~15 s.
WORKERS = 32
# The clients used from the threads keep one connection per worker (botocore's default pool holds 10).
POOLED_CLIENT_CONFIG = Config(max_pool_connections=WORKERS)


def in_parallel(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``[function(item) for item in items]`` on WORKERS threads, in order; the first error is raised."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(function, items))
