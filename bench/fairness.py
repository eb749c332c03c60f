"""Fairness: three jobs on one worker credential against Canvas's rate limit.

Run by hand (not in CI); see README.md, "Fairness under Canvas's rate limit":

    .venv/bin/python bench/fairness.py                        # 30 s per mode, both modes
    .venv/bin/python bench/fairness.py --seconds 10 --no-save # a quick look
    .venv/bin/python bench/fairness.py --replicas 2 --workers 2   # four processes, one database

It starts the simulator, whose throttle is Canvas's (a leaky bucket of high-water mark 600,
outflow 10 a second, an up-front cost of 50 while a call is in flight, a cost of 1 for the
course lookup used here), then, once with the broker's fair share on (``BROKER_CANVAS_RESERVE``
200, the default) and once with it off (0), a fresh broker with one worker credential and
three clients of equal weight: one greedy job (four threads calling as fast as they can) and
two steady ones (one call every ``1 / --steady-rate`` seconds each, never retrying). For each
mode it reports each client's admitted calls a second, the calls the broker held back
(``429 canvas_capacity``), the Canvas ``403`` rate-limit answers that got through, and Jain's
fairness index among the clients that asked for more than an equal share of the outflow.

With ``--replicas R --workers W`` the broker is R ``broker serve --workers W`` on one SQLite
file; each job's connections are keep-alive, so they stay on the processes they reached
first: the greedy job's go to the first replica, the steady jobs' to the last, which is where
a broker that shared out the outflow per process went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from procs import Children
from soak import Broker, base_env, start_sim

BENCH_DIR = Path(__file__).resolve().parent
WORKER_TOKEN = "fairness-worker-token"
COURSE = "/api/v1/courses/1201"
OUTFLOW = 10.0  # the simulator's default, Canvas's too
GREEDY_THREADS = 4


@dataclass
class Counts:
    """What one client's calls got."""

    name: str
    asked_per_s: float | None  # None: as fast as it can
    admitted: int = 0
    held_back: int = 0
    canvas_403: int = 0
    other: int = 0
    other_statuses: dict[str, int] = field(default_factory=dict)
    counting: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, response: httpx.Response | None) -> None:
        """Count one answer."""
        if not self.counting:
            return
        with self.lock:
            if response is None:
                self.other += 1
                self.other_statuses["no answer"] = self.other_statuses.get("no answer", 0) + 1
            elif response.status_code == 200:
                self.admitted += 1
            elif response.status_code == 429:
                self.held_back += 1
            elif response.status_code == 403:
                self.canvas_403 += 1
            else:
                self.other += 1
                key = f"{response.status_code} {_error(response)}"
                self.other_statuses[key] = self.other_statuses.get(key, 0) + 1


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))
    except ValueError:
        return ""


def jain(values: list[float]) -> float | None:
    """Jain's fairness index: 1 when all are equal, 1/n when one has everything."""
    if not values or not any(values):
        return None
    return round(sum(values) ** 2 / (len(values) * sum(v * v for v in values)), 3)


def _call(http: httpx.Client, url: str, token: str) -> httpx.Response | None:
    try:
        return http.get(url + COURSE, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError:
        return None


def greedy(url: str, token: str, counts: Counts, stop: threading.Event) -> None:
    """As fast as it can, ignoring every Retry-After."""
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            counts.add(_call(http, url, token))


def steady(url: str, token: str, counts: Counts, stop: threading.Event, rate: float) -> None:
    """One call every ``1 / rate`` seconds, on schedule, never retrying."""
    interval = 1 / rate
    next_at = time.monotonic()
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            counts.add(_call(http, url, token))
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


def run_mode(
    children: Children,
    workdir: Path,
    sim_url: str,
    *,
    fair: bool,
    seconds: float,
    warmup: float,
    rate: float,
    replicas: int = 1,
    workers: int = 1,
) -> dict[str, Any]:
    """One broker (``replicas`` of ``workers`` each), three clients, ``seconds`` of load."""
    home = workdir / ("fair" if fair else "unshared")
    home.mkdir()
    env = {**base_env(home), "BROKER_CANVAS_RESERVE": "200" if fair else "0"}
    broker = Broker(children, home, env, f"broker-{home.name}", workers=workers)
    urls, processes = [broker.url], [broker.child]
    for n in range(1, replicas):
        url, child = broker.serve(f"broker-{home.name}-{n}")
        urls.append(url)
        processes.append(child)
    greedy_url, steady_url = urls[0], urls[-1]
    broker.post("/broker/v1/upstreams", {"name": "canvas", "base_url": sim_url})
    broker.post(
        "/broker/v1/credentials", {"upstream": "canvas", "name": "worker", "token": WORKER_TOKEN}
    )
    clients = {}
    for name in ("greedy", "steady-1", "steady-2"):
        made = broker.post(
            "/broker/v1/clients",
            {"name": name, "credential": "worker", "scopes": [f"url:GET|{COURSE}"]},
        )
        clients[name] = broker.token((made["client_id"], made["client_secret"]))
    counts = {
        "greedy": Counts("greedy", None),
        "steady-1": Counts("steady-1", rate),
        "steady-2": Counts("steady-2", rate),
    }
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=greedy, args=(greedy_url, clients["greedy"], counts["greedy"], stop)
        )
        for _ in range(GREEDY_THREADS)
    ] + [
        threading.Thread(target=steady, args=(steady_url, clients[name], counts[name], stop, rate))
        for name in ("steady-1", "steady-2")
    ]
    for thread in threads:
        thread.start()
    time.sleep(warmup)  # until the bucket is down to the reserve and the sharing has settled
    started = time.monotonic()
    for each in counts.values():
        each.counting = True
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    for each in counts.values():
        each.counting = False
    stop.set()
    for thread in threads:
        thread.join(60)
    for child in processes:
        children.stop(child)
    share = OUTFLOW / len(counts)
    wanting = [c for c in counts.values() if c.asked_per_s is None or c.asked_per_s > share]
    per_s = {name: round(c.admitted / elapsed, 2) for name, c in counts.items()}
    return {
        "fair_share": fair,
        "replicas": replicas,
        "workers": workers,
        "seconds": round(elapsed, 1),
        "clients": {
            name: {
                "asked_per_s": c.asked_per_s,
                "admitted_per_s": per_s[name],
                "held_back": c.held_back,
                "canvas_403": c.canvas_403,
                "other": c.other,
                "other_statuses": c.other_statuses,
            }
            for name, c in counts.items()
        },
        "jain_index_wanting_more": jain([c.admitted / elapsed for c in wanting]),
        "canvas_403_total": sum(c.canvas_403 for c in counts.values()),
    }


def main(argv: list[str] | None = None) -> int:
    """Both modes in one run; print the report, save it unless --no-save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured load per mode")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="load before measuring (bucket filling)"
    )
    parser.add_argument("--steady-rate", type=float, default=5.0, help="calls/s per steady job")
    parser.add_argument("--replicas", type=int, default=1, help="broker serve processes")
    parser.add_argument("--workers", type=int, default=1, help="workers of each broker serve")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not 2 <= args.seconds <= 600 or not 0 < args.steady_rate <= 100:
        parser.error("--seconds must be 2 to 600 and --steady-rate above 0, at most 100")
    if not 1 <= args.replicas <= 8 or not 1 <= args.workers <= 8:
        parser.error("--replicas and --workers must be 1 to 8")
    workdir = Path(tempfile.mkdtemp(prefix="ctb-fairness-"))
    children = Children(workdir)
    try:
        sim_url = start_sim(children, WORKER_TOKEN)
        modes: list[dict[str, Any]] = []
        for fair in (True, False):
            # An empty bucket for each mode: from its maximum (800) it leaks empty in 80 s at
            # the outflow.
            if modes:
                time.sleep(85)
            modes.append(
                run_mode(
                    children,
                    workdir,
                    sim_url,
                    fair=fair,
                    seconds=args.seconds,
                    warmup=args.warmup,
                    rate=args.steady_rate,
                    replicas=args.replicas,
                    workers=args.workers,
                )
            )
            print(json.dumps(modes[-1]), file=sys.stderr, flush=True)
    finally:
        children.stop_all()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "outflow_per_s": OUTFLOW,
        "steady_rate_per_s": args.steady_rate,
        "warmup_seconds": args.warmup,
        "modes": modes,
    }
    print(json.dumps(report, indent=2))
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        shape = "" if args.replicas == args.workers == 1 else f"-{args.replicas}x{args.workers}"
        path = args.results_dir / f"{datetime.now(UTC):%Y-%m-%d}-fairness{shape}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
