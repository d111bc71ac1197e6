"""Drives the load: Poisson arrivals (or one burst), an optional in-flight cap, a progress bar."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Optional

import aiohttp
import numpy as np
from tqdm.asyncio import tqdm

from sglx.benchmark.backends import RequestFn, RequestInput, RequestOutput

# Long enough for the slowest honest run; a per-request hang shows up as a failed request, not a stuck process.
_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


def poisson_arrival_offsets(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s, from the start) of n requests: exponential gaps of mean 1/rate, i.e. a Poisson process.
    The first request leaves at 0; rate=inf sends everything at once."""
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0:
        raise ValueError("request rate must be positive")
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


@dataclass
class RunResult:
    outputs: list[RequestOutput]
    start_time: float  # perf_counter at the first send
    duration: float


def make_session() -> aiohttp.ClientSession:
    # aiohttp caps a session at 100 connections by default, which would silently throttle big bursts.
    return aiohttp.ClientSession(timeout=_TIMEOUT, connector=aiohttp.TCPConnector(limit=0),
                                 read_bufsize=1 << 20)


async def _safe_call(fn: RequestFn, session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    start = time.perf_counter()
    try:
        return await fn(session, req)
    except Exception as e:  # noqa: BLE001
        # Transport failures, broken JSON or an unexpected response shape are one failed request, reported in
        # the metrics; they must not abort a long benchmark run.
        return RequestOutput(prompt_len=req.prompt_len, start_time=start,
                             latency=time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


async def run_warmup(fn: RequestFn, reqs: list[RequestInput]) -> list[RequestOutput]:
    async with make_session() as session:
        return await asyncio.gather(*(_safe_call(fn, session, r) for r in reqs))


async def run_load(fn: RequestFn, reqs: list[RequestInput], request_rate: float,
                   max_concurrency: Optional[int], seed: int, show_progress: bool = True) -> RunResult:
    offsets = poisson_arrival_offsets(len(reqs), request_rate, np.random.default_rng(seed))
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(reqs), disable=not show_progress)

    async def one(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
        if limit is None:
            result = await _safe_call(fn, session, req)
        else:
            async with limit:
                result = await _safe_call(fn, session, req)
        bar.update(1)
        return result

    async with make_session() as session:
        start = time.perf_counter()
        tasks = []
        for req, offset in zip(reqs, offsets.tolist()):
            # Sleep to an absolute send time so scheduling delays don't accumulate into a lower rate.
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, req)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return RunResult(outputs, start, duration)
