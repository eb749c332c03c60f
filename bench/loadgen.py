"""The built-in load client, used when ``wrk`` is not installed (or with ``--loadgen builtin``).

Run as its own process by ``bench/run.py``; prints one JSON object on standard output::

    python bench/loadgen.py --url http://127.0.0.1:9001/api/v1/... \
        --header "Authorization: Bearer ..." --concurrency 32 --duration 10

``concurrency`` workers share one aiohttp session whose pool keeps exactly that many
keep-alive connections; each worker sends its next request as soon as the previous answer
has been read in full (a closed loop, like ``wrk``). Every response is timed; any status other
than 200 and any connection error is counted, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from collections.abc import Coroutine


def percentile(sorted_values: list[int], fraction: float) -> int:
    """The nearest-rank percentile of already sorted values (0 if there are none)."""
    if not sorted_values:
        return 0
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def drive(
    url: str, headers: dict[str, str], concurrency: int, duration: float, request_timeout: float
) -> dict[str, object]:
    """Run the closed loop for ``duration`` seconds and summarise it."""
    latencies: list[int] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False, ttl_dns_cache=None)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    clock = time.perf_counter_ns
    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, skip_auto_headers=("User-Agent",)
    ) as session:
        deadline = clock() + int(duration * 1e9)

        async def worker() -> None:
            while clock() < deadline:
                started = clock()
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(clock() - started)
                statuses[status] += 1

        began = clock()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = (clock() - began) / 1e9
    latencies.sort()
    completed = sum(statuses.values())
    return {
        "tool": "builtin",
        "requests": completed,
        "elapsed_s": elapsed,
        "ok": statuses.get(200, 0),
        "non_200": completed - statuses.get(200, 0),
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "socket_errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "latency_us": {
            "p50": percentile(latencies, 0.50) / 1000,
            "p90": percentile(latencies, 0.90) / 1000,
            "p99": percentile(latencies, 0.99) / 1000,
            "max": (latencies[-1] / 1000) if latencies else 0,
            "mean": (sum(latencies) / len(latencies) / 1000) if latencies else 0,
        },
    }


def run_loop(coro: Coroutine[None, None, dict[str, object]]) -> dict[str, object]:
    """Run ``coro`` on uvloop when it is installed, else on the default event loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args()
    headers = {}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    coro = drive(args.url, headers, args.concurrency, args.duration, args.timeout)
    result = run_loop(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
