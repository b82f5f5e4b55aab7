"""Every benchmark of the performance issue in one run: one table of goals, and a JSON file.

::

    python -m benchmarks.run [--quick] [--json PATH] [--only kernels,push,...] [--details]

Runs, in this order, each against its reference measured in the same run:

1. ``kernels`` (:mod:`benchmarks.kernels`): ns per element of each optimizer's fused kernel
   against a loop with the same memory traffic (and torch's Adam where installed);
2. ``push`` (:mod:`benchmarks.push`): push round trip at 1e6 and 1e7 parameters, p50 and p99,
   raw-socket client against a raw TCP echo of the same bytes, our client against the
   raw-socket client;
3. ``throughput`` (:mod:`benchmarks.throughput`): small pushes per second from concurrent
   connections against a bare FastAPI echo served by uvicorn the same way;
4. ``memory`` (:mod:`benchmarks.memory`): resident size per session against its weights and
   slots, and the extra peak during a 1e7-parameter push against the body size.

It prints one table (figure, ours, reference, ratio, goal, verdict) and writes everything
(the goals, every row of every benchmark, the machine and the command) to ``--json``
(default ``benchmarks/results/latest.json``). ``--quick`` takes fewer samples and skips the
1e5 and 1e7 kernel sizes: for a first look, not for figures to quote. Servers run as
subprocesses on 127.0.0.1 and stop with the run; every loop is bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import kernels, memory, push, throughput

__all__ = ["BENCHMARKS", "PLANS", "Plan", "goal_rows", "machine", "main", "run"]

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run (``push_samples=None``: by size, see
    :func:`benchmarks.push.default_samples`)."""

    kernel_sizes: tuple[int, ...]
    kernel_repeats: int
    push_sizes: tuple[int, ...]
    push_samples: int | None
    push_rounds: int
    push_quick: bool
    throughput_connections: int
    throughput_seconds: float
    throughput_rounds: int
    memory_sessions: int
    memory_parameters: int
    memory_peak_parameters: int
    memory_pushes: int


PLANS = {
    "full": Plan(
        kernel_sizes=(10**5, 10**6, 10**7),
        kernel_repeats=9,
        push_sizes=(10**6, 10**7),
        push_samples=None,
        push_rounds=6,
        push_quick=False,
        throughput_connections=16,
        throughput_seconds=2.0,
        throughput_rounds=5,
        memory_sessions=8,
        memory_parameters=10**6,
        memory_peak_parameters=10**7,
        memory_pushes=5,
    ),
    "quick": Plan(
        kernel_sizes=(10**6,),
        kernel_repeats=3,
        push_sizes=(10**6, 10**7),
        push_samples=None,
        push_rounds=4,
        push_quick=True,
        throughput_connections=16,
        throughput_seconds=1.0,
        throughput_rounds=3,
        memory_sessions=4,
        memory_parameters=10**6,
        memory_peak_parameters=10**7,
        memory_pushes=3,
    ),
}


def _kernels(plan: Plan) -> list[dict[str, Any]]:
    return kernels.run(plan.kernel_sizes, plan.kernel_repeats)


def _push(plan: Plan) -> list[dict[str, Any]]:
    return push.run(
        plan.push_sizes, samples=plan.push_samples, rounds=plan.push_rounds, quick=plan.push_quick
    )


def _throughput(plan: Plan) -> list[dict[str, Any]]:
    return throughput.run(
        connections=plan.throughput_connections,
        seconds=plan.throughput_seconds,
        rounds=plan.throughput_rounds,
    )


def _memory(plan: Plan) -> list[dict[str, Any]]:
    return memory.run(
        sessions=plan.memory_sessions,
        parameters=plan.memory_parameters,
        peak_parameters=plan.memory_peak_parameters,
        pushes=plan.memory_pushes,
    )


#: The benchmarks, in the order they run.
BENCHMARKS: dict[str, Callable[[Plan], list[dict[str, Any]]]] = {
    "kernels": _kernels,
    "push": _push,
    "throughput": _throughput,
    "memory": _memory,
}


# --- the goals ---------------------------------------------------------------------------


def _goal(
    figure: str,
    ours: str,
    reference: str,
    ratio: float | None,
    goal: float | None,
    *,
    at_least: bool = False,
) -> dict[str, Any]:
    """One line of the table. ``goal`` is a ceiling on ``ratio`` (a floor with ``at_least``);
    without a goal the line is information only."""
    if goal is None or ratio is None or not math.isfinite(ratio):
        verdict = "-"
        goal_text = "-"
    else:
        met = ratio >= goal if at_least else ratio <= goal
        verdict = "met" if met else "NOT met"
        goal_text = f"{'>=' if at_least else '<='} {goal:g}"
    return {
        "figure": figure,
        "ours": ours,
        "reference": reference,
        "ratio": ratio,
        "goal": goal_text,
        "verdict": verdict,
    }


def _kernel_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("floor_ns") is None:  # the sum_squares row has no floor
            continue
        size = f"{r['elements']:.0e}"
        gated = r["elements"] >= 10**6  # the goals are stated for 1e6 and 1e7 elements
        out.append(
            _goal(
                f"kernel {r['optimizer']} {size} (ns/element)",
                f"{r['numba_ns']:.3f}",
                f"{r['floor_ns']:.3f} floor",
                r["floor_ratio"],
                r["goal_floor_ratio"] if gated else None,
            )
        )
        if r.get("torch_ns") is not None:
            out.append(
                _goal(
                    f"kernel {r['optimizer']} {size} vs torch",
                    f"{r['numba_ns']:.3f}",
                    f"{r['torch_ns']:.3f} torch {r['torch_impl']}",
                    r["torch_ratio"],
                    kernels.TORCH_GOAL if gated else None,
                )
            )
    return out


def _push_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        size = f"{r['parameters']:.0e}"
        gated = r["parameters"] == 10**6  # the goals are stated for 1e6 parameters
        for q in ("p50", "p99"):
            goal_on = gated and q == "p50"
            out.append(
                _goal(
                    f"push {size} {q} raw client vs TCP echo (ms)",
                    f"{r[f'raw_{q}_ms']:.2f}",
                    f"{r[f'echo_{q}_ms']:.2f} echo",
                    r[f"raw_vs_echo_{q}"],
                    r["goal_raw_vs_echo_p50"] if goal_on else None,
                )
            )
            if q == "p50":
                out.append(
                    _goal(
                        f"push {size} {q} bare uvicorn echo vs TCP echo (ms)",
                        f"{r[f'uvicorn_{q}_ms']:.2f}",
                        f"{r[f'echo_{q}_ms']:.2f} echo",
                        r[f"uvicorn_vs_echo_{q}"],
                        None,
                    )
                )
                out.append(
                    _goal(
                        f"push {size} {q} raw client vs bare uvicorn echo (ms)",
                        f"{r[f'raw_{q}_ms']:.2f}",
                        f"{r[f'uvicorn_{q}_ms']:.2f} uvicorn",
                        r[f"raw_vs_uvicorn_{q}"],
                        None,
                    )
                )
            out.append(
                _goal(
                    f"push {size} {q} our client vs raw client (ms)",
                    f"{r[f'client_{q}_ms']:.2f}",
                    f"{r[f'raw_{q}_ms']:.2f} raw",
                    r[f"client_vs_raw_{q}"],
                    r["goal_client_vs_raw_p50"] if goal_on else None,
                )
            )
    return out


def _throughput_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        _goal(
            f"small pushes/s, {r['connections']} conns, "
            + ("1 shared session" if r["sessions"] == "shared" else "a session each"),
            f"{r['ours_per_s']:.0f}",
            f"{r['echo_per_s']:.0f} echo",
            r["ratio"],
            r["goal_ratio"],
            at_least=True,
        )
        for r in rows
    ]


def _memory_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    mib = memory.MiB
    out = []
    for r in rows:
        if r["figure"] == "session_rss":
            out.append(
                _goal(
                    f"RSS per session, {r['parameters']:.0e} params (MiB)",
                    f"{r['rss_per_session'] / mib:.1f}",
                    f"{r['session_bytes'] / mib:.1f} weights+slots",
                    r["ratio"],
                    r["goal_ratio"],
                )
            )
        elif r["figure"] == "idempotency_rss":
            out.append(
                _goal(
                    "RSS kept per client push (idempotency) (MiB)",
                    f"{r['rss_per_push'] / mib:.1f}",
                    f"{r['response_bytes'] / mib:.1f} answer",
                    r["rss_per_push"] / r["response_bytes"],
                    None,
                )
            )
        elif r["figure"] == "push_peak":
            out.append(
                _goal(
                    f"peak extra RSS, {r['parameters']:.0e} push (MiB)",
                    f"{r['extra_peak_bytes'] / mib:.1f}",
                    f"{r['request_bytes'] / mib:.1f} body",
                    r["ratio"],
                    r["goal_ratio"],
                )
            )
    return out


_GOALS: dict[str, Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]]] = {
    "kernels": _kernel_goals,
    "push": _push_goals,
    "throughput": _throughput_goals,
    "memory": _memory_goals,
}


def goal_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The lines of the table for whichever benchmarks ``results`` holds."""
    out = []
    for name, rows in results.items():
        for line in _GOALS[name](rows):
            out.append({"benchmark": name, **line})
    return out


def format_goals(lines: Sequence[dict[str, Any]]) -> str:
    columns = [
        ("figure", "figure"),
        ("ours", "ours"),
        ("reference", "reference"),
        ("ratio", "ratio"),
        ("goal", "goal"),
        ("verdict", "verdict"),
    ]
    cells = [[title for _, title in columns]]
    for line in lines:
        ratio = line["ratio"]
        cells.append(
            [
                line["figure"],
                line["ours"],
                line["reference"],
                "-" if ratio is None else f"{ratio:.2f}",
                line["goal"],
                line["verdict"],
            ]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = [
        "  ".join(
            c.ljust(w) if i in (0, 2) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


# --- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _simd() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags]
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "simd": _simd(),
        "mem_total_bytes": _mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in (
                "numpy",
                "numba",
                "msgpack",
                "fastapi",
                "starlette",
                "uvicorn",
                "httptools",
                "uvloop",
                "h11",
                "httpx",
                "torch",
            )
        },
        "loadavg": list(os.getloadavg()),
    }


# --- the run -----------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def run(
    *,
    quick: bool = False,
    plan: Plan | None = None,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmarks (all, or those in ``only``) with ``plan`` (default: the full or
    quick one); returns the JSON document."""
    plan = plan if plan is not None else PLANS["quick" if quick else "full"]
    names = list(BENCHMARKS) if only is None else [n for n in BENCHMARKS if n in only]
    started = time.time()
    doc: dict[str, Any] = {
        "command": command or "python -m benchmarks.run",
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "quick": quick,
        "plan": dataclasses.asdict(plan),
        "machine": machine(),
        "results": {},
        "seconds": {},
    }
    for name in names:
        log(f"running {name} ...")
        t0 = time.perf_counter()
        doc["results"][name] = BENCHMARKS[name](plan)
        doc["seconds"][name] = time.perf_counter() - t0
    doc["goals"] = goal_rows(doc["results"])
    doc["loadavg_after"] = list(os.getloadavg())
    doc["duration_seconds"] = time.time() - started
    return doc


def _details(doc: dict[str, Any]) -> str:
    parts = []
    results = doc["results"]
    if "kernels" in results:
        parts.append("kernels (ns per element):\n" + kernels.format_table(results["kernels"]))
    if "push" in results:
        parts.append("push round trip (ms):\n" + push.format_table(results["push"]))
    if "throughput" in results:
        parts.append(
            "throughput (pushes/s):\n"
            + push.format_table(results["throughput"], throughput.COLUMNS)
        )
    if "memory" in results:
        parts.append("memory:\n" + memory.format_rows(results["memory"]))
    return "\n\n".join(parts)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every server subprocess is stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a first look")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--details", action="store_true", help="also print every benchmark's rows")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",")]
        unknown = sorted(set(only) - set(BENCHMARKS))
        if unknown:
            parser.error(
                f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
            )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = shlex.join(
        ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
    )
    doc = run(
        quick=args.quick,
        only=only,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        command=command,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    m = doc["machine"]
    print(
        f"{m['nproc']} CPUs ({m['cpu_model']}), python {m['python']}, numpy "
        f"{m['versions']['numpy']}, numba {m['versions']['numba']}; load average "
        f"{m['loadavg'][0]:.2f} before, {doc['loadavg_after'][0]:.2f} after; "
        f"{doc['duration_seconds']:.0f} s{' (quick)' if doc['quick'] else ''}"
    )
    if args.details:
        print(_details(doc))
        print()
    print(format_goals(doc["goals"]))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
