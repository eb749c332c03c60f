"""Derived numbers and the Markdown report of a benchmark run."""

from __future__ import annotations

from typing import Any


def _point(points: list[dict[str, Any]], target: str, concurrency: int) -> dict[str, Any] | None:
    for point in points:
        if point["target"] == target and point["concurrency"] == concurrency:
            return point
    return None


def _brokers(points: list[dict[str, Any]]) -> list[str]:
    """The broker legs' names in run order: ``broker``, or ``broker-w1``, ``broker-w2``…"""
    return list(dict.fromkeys(p["target"] for p in points if p["target"].startswith("broker")))


Ratios = dict[str, dict[str, float]]
"""Per concurrency (as text), ratio name such as ``broker/floor`` -> value."""


def _ratios(points: list[dict[str, Any]], brokers: list[str]) -> tuple[Ratios, Ratios, Ratios]:
    """Per concurrency, each broker leg's throughput over direct, nginx and the floor, its CPU
    per request over nginx's and the floor's, and its throughput over the first broker leg's.
    """
    ratios: Ratios = {}
    cpu: Ratios = {}
    scaling: Ratios = {}
    for point in points:
        if point["target"] not in brokers:
            continue
        concurrency = str(point["concurrency"])
        row = ratios.setdefault(concurrency, {})
        cpu_row = cpu.setdefault(concurrency, {})
        for base in ("direct", "nginx", "floor"):
            other = _point(points, base, point["concurrency"])
            if other and other["rps"]:
                row[f"{point['target']}/{base}"] = point["rps"] / other["rps"]
            # 'direct' has no proxy: its CPU column is the upstream's.
            if other and base != "direct" and other["cpu_us_per_request"]:
                cpu_row[f"{point['target']}/{base}"] = (
                    point["cpu_us_per_request"] / other["cpu_us_per_request"]
                )
        first = _point(points, brokers[0], point["concurrency"])
        if point["target"] != brokers[0] and first and first["rps"]:
            scaling.setdefault(concurrency, {})[f"{point['target']}/{brokers[0]}"] = (
                point["rps"] / first["rps"]
            )
    return ratios, cpu, scaling


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency added over direct at concurrency 1, throughput ratios, broker CPU per request.

    Per concurrency, ``throughput_ratios`` holds each broker leg's req/s over direct's,
    nginx's and the floor's, and ``cpu_ratios`` its CPU per request over nginx's and the
    floor's. With several broker legs (one per worker count), also each leg's throughput over
    the first leg's (``worker_scaling``).
    """
    summary: dict[str, Any] = {}
    brokers = _brokers(points)
    direct1 = _point(points, "direct", 1)
    for proxy in ("nginx", "floor", *brokers):
        proxied = _point(points, proxy, 1)
        if direct1 and proxied:
            summary[f"{proxy}_added_p50_ms_c1"] = proxied["p50_ms"] - direct1["p50_ms"]
            summary[f"{proxy}_added_p99_ms_c1"] = proxied["p99_ms"] - direct1["p99_ms"]
    ratios, cpu, scaling = _ratios(points, brokers)
    if any(ratios.values()):
        summary["throughput_ratios"] = ratios
    if any(cpu.values()):
        summary["cpu_ratios"] = cpu
    if scaling:
        summary["worker_scaling"] = scaling
    if brokers:
        summary["broker_cpu_us_per_request"] = {
            name: {
                str(p["concurrency"]): p["cpu_us_per_request"]
                for p in points
                if p["target"] == name
            }
            for name in brokers
        }
    summary["total_errors"] = sum(p["non_200"] + p["socket_errors"] for p in points)
    return summary


def markdown(results: dict[str, Any]) -> str:
    """The run as a Markdown document: environment, table, derived numbers, audit check."""
    env = results["environment"]
    opts = results["options"]
    pkgs = env["packages"]
    loadgen = env.get("wrk") if env["load_generator"] == "wrk" else "built-in aiohttp client"
    modified = " (broker/ modified)" if env.get("broker_tree_modified") else ""
    lines = [
        (
            f"# Proxy benchmark, {env['date']} ({env['database']}, "
            f"{_workers(opts['workers'])} broker worker(s))"
        ),
        "",
        (
            f"- machine: {env['cpu_count']} CPU(s), {env['cpu_model']}, Linux {env['kernel']}; "
            "**the load generator, the upstream and the proxy under test share these CPUs**"
        ),
        (
            f"- Python {env['python']}; uvicorn {pkgs.get('uvicorn')}, "
            f"uvloop {pkgs.get('uvloop')}, aiohttp {pkgs.get('aiohttp')}, "
            f"fastapi {pkgs.get('fastapi')}, sqlalchemy {pkgs.get('sqlalchemy')}"
        ),
        f"- load: {loadgen}; nginx: {env.get('nginx') or 'not installed'}",
        f"- database: {env['database_version']}; git commit {env['git_commit']}{modified}",
        _disk(env),
        _speed(env),
        (
            f"- each point: {opts['duration_s']} s closed loop after a {opts['warmup_s']} s "
            f"warm-up per target; GET {opts['path']} -> {opts['response_bytes']} B JSON "
            "+ Link header"
        ),
        "",
        (
            "| target | conc | req/s | p50 ms | p99 ms | errors "
            "| proxy CPU us/req (user + sys) | upstream CPU us/req |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["points"]:
        errors = p["non_200"] + p["socket_errors"]
        error_text = str(errors)
        if errors:
            error_text = f"**{errors}** ({p['non_200']} non-200, {p['socket_errors']} socket)"
        cpu = "-"
        if p["target"] != "direct":
            cpu = (
                f"{p['cpu_us_per_request']:.0f} ({p['cpu_user_us_per_request']:.0f} + "
                f"{p['cpu_sys_us_per_request']:.0f})"
            )
        lines.append(
            f"| {p['target']} | {p['concurrency']} | {p['rps']:,.0f} | {p['p50_ms']:.3f} "
            f"| {p['p99_ms']:.3f} | {error_text} | {cpu} "
            f"| {p['upstream_cpu_us_per_request']:.0f} |"
        )
    summary = results["summary"]
    lines.append("")
    for proxy in ("nginx", "floor", *_brokers(results["points"])):
        key = f"{proxy}_added_p50_ms_c1"
        if key in summary:
            lines.append(
                f"- {proxy} adds {summary[key] * 1000:.0f} us at p50 "
                f"({summary[f'{proxy}_added_p99_ms_c1'] * 1000:.0f} us at p99) "
                "over direct at concurrency 1"
            )
    lines.extend(_ratio_lines(summary))
    audit = results.get("audit")
    if audit:
        lines.append(f"- {audit['summary']}")
    lines.append(f"- errors (non-200 + socket) across all points: {summary['total_errors']}")
    lines.extend(f"- note: {note}" for note in results.get("notes", []))
    return "\n".join(lines) + "\n"


# Summary key, label and number format of the per-concurrency ratio lines, in report order.
_RATIO_LINES = (
    ("throughput_ratios", "throughput", "{:.3f}"),
    ("cpu_ratios", "proxy CPU per request", "{:.2f}x"),
    ("worker_scaling", "worker scaling", "{:.2f}x"),
)


def _ratio_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for key, label, number in _RATIO_LINES:
        for concurrency, row in summary.get(key, {}).items():
            text = ", ".join(f"{name} {number.format(value)}" for name, value in row.items())
            if text:
                lines.append(f"- {label} at c={concurrency}: {text}")
    return lines


def _disk(env: dict[str, Any]) -> str:
    sync = env.get("fdatasync_us")
    if not sync:
        return "- disk: fdatasync latency not recorded"
    return (
        f"- disk: fdatasync of 8 KiB in the work directory p50 {sync['p50']} us, "
        f"p90 {sync['p90']} us (each audit commit waits for a sync like it)"
    )


def _workers(workers: int | list[int]) -> str:
    """``1``, or ``1 and 2`` for a run with a broker leg per worker count."""
    if isinstance(workers, int):  # results files written before worker lists
        return str(workers)
    return " and ".join(str(count) for count in workers)


def _speed(env: dict[str, Any]) -> str:
    speed = env.get("python_speed_ms")
    if speed is None:
        return "- Python speed: not recorded"
    return (
        f"- Python speed: {speed} ms for the benchmark's fixed pure-Python workload (best of 5; "
        "lower is faster; the broker's CPU per call moves with it)"
    )
