"""Every benchmark of the performance issue in one run: one table of goals, and a JSON file.

::

    python -m benchmarks.run [--quick] [--json PATH] [--only kernels,push,...] [--details]

Runs, in this order, each against its reference measured in the same run:

1. ``kernels`` (:mod:`benchmarks.kernels`): ns per element of each optimizer's fused kernel
   against a loop with the same memory traffic (and torch's Adam where installed);
2. ``push`` (:mod:`benchmarks.push`): push round trip at 1e6 and 1e7 parameters, p50 and p99,
   and CPU time per push (server and worker processes): our client (over the data plane;
   with ``out=``; forced onto HTTP), a raw frame client, a raw HTTP client and a bare
   uvicorn echo, against a raw TCP echo of the same bytes;
3. ``concurrency`` (:mod:`benchmarks.concurrency`): worker processes, each with its own
   client, pushing 1e6 parameters into one session at once: bytes per second against as many
   concurrent TCP echoes;
4. ``throughput`` (:mod:`benchmarks.throughput`): small pushes per second from concurrent
   connections (a raw HTTP load, a raw frame load, and our client in worker processes), and
   one connection's push latency, against a bare FastAPI echo served by uvicorn the same way;
5. ``memory`` (:mod:`benchmarks.memory`): resident size per session against its weights and
   slots, and the extra peak during a 1e7-parameter push (over HTTP and over the data plane)
   against the body size;
6. ``training_modes`` (:mod:`benchmarks.training_modes`): worker processes, each with its own
   client, pushing 1e6 parameters into one sync-mode session (rounds of one gradient per
   worker) and into one async session: steps and gradients per second, and the ratio of the
   gradients per second (reported, no goal);
7. ``shards`` (:mod:`benchmarks.shards`): 1 and 2 worker processes pushing a 1e7-parameter
   model (seven tensors, Adam) into a sharded session over 1, 2 and 3 server processes, and
   into an ordinary session with the plain client, the answers received into new arrays and
   with ``out=``: pushes per second, p50, CPU per push, and the ratios to one shard and to
   the plain client (reported, no goal; docs/scaling.md);
8. ``sparse`` (:mod:`benchmarks.sparse`): a (1e6, 64) float32 embedding (Adam) and pushes of
   0.1 % and 1 % of its rows: in process, the optimizer's step with a dense gradient (the
   dense kernel pass) against row gradients in exact and in lazy mode; end to end, bytes up
   and down and p50 of a dense push (data plane) against row pushes answered with their rows
   (HTTP), into an exact and a lazy session.

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

from . import concurrency, kernels, memory, push, shards, sparse, throughput, training_modes

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
    concurrency_workers: int
    concurrency_parameters: int
    concurrency_seconds: float
    concurrency_rounds: int
    throughput_connections: int
    throughput_client_processes: int
    throughput_seconds: float
    throughput_rounds: int
    throughput_latency_samples: int
    memory_sessions: int
    memory_parameters: int
    memory_peak_parameters: int
    memory_pushes: int
    training_workers: int
    training_parameters: int
    training_seconds: float
    training_rounds: int
    shards_counts: tuple[int, ...]
    shards_workers: tuple[int, ...]
    shards_receives: tuple[str, ...]
    shards_parameters: int
    shards_seconds: float
    shards_rounds: int
    sparse_rows: int
    sparse_width: int
    sparse_fractions: tuple[float, ...]
    sparse_step_repeats: int
    sparse_push_samples: int
    sparse_dense_samples: int
    sparse_push_rounds: int


PLANS = {
    "full": Plan(
        kernel_sizes=(10**5, 10**6, 10**7),
        kernel_repeats=9,
        push_sizes=(10**6, 10**7),
        push_samples=None,
        push_rounds=6,
        push_quick=False,
        concurrency_workers=4,
        concurrency_parameters=10**6,
        concurrency_seconds=2.0,
        concurrency_rounds=3,
        throughput_connections=16,
        throughput_client_processes=4,
        throughput_seconds=1.5,
        throughput_rounds=4,
        throughput_latency_samples=1000,
        memory_sessions=8,
        memory_parameters=10**6,
        memory_peak_parameters=10**7,
        memory_pushes=5,
        training_workers=4,
        training_parameters=10**6,
        training_seconds=2.0,
        training_rounds=3,
        shards_counts=(1, 2, 3),
        shards_workers=(1, 2),
        shards_receives=("new", "out"),
        shards_parameters=10**7,
        shards_seconds=0.75,
        shards_rounds=3,
        sparse_rows=10**6,
        sparse_width=64,
        sparse_fractions=(0.001, 0.01),
        sparse_step_repeats=9,
        sparse_push_samples=40,
        sparse_dense_samples=8,
        sparse_push_rounds=4,
    ),
    "quick": Plan(
        kernel_sizes=(10**6,),
        kernel_repeats=3,
        push_sizes=(10**6, 10**7),
        push_samples=None,
        push_rounds=4,
        push_quick=True,
        concurrency_workers=4,
        concurrency_parameters=10**6,
        concurrency_seconds=1.0,
        concurrency_rounds=2,
        throughput_connections=16,
        throughput_client_processes=4,
        throughput_seconds=1.0,
        throughput_rounds=2,
        throughput_latency_samples=300,
        memory_sessions=4,
        memory_parameters=10**6,
        memory_peak_parameters=10**7,
        memory_pushes=3,
        training_workers=4,
        training_parameters=10**6,
        training_seconds=1.0,
        training_rounds=2,
        shards_counts=(1, 2, 3),
        shards_workers=(1, 2),
        shards_receives=("new", "out"),
        shards_parameters=10**7,
        shards_seconds=0.4,
        shards_rounds=2,
        sparse_rows=10**6,
        sparse_width=64,
        sparse_fractions=(0.001, 0.01),
        sparse_step_repeats=3,
        sparse_push_samples=12,
        sparse_dense_samples=3,
        sparse_push_rounds=2,
    ),
}


def _kernels(plan: Plan) -> list[dict[str, Any]]:
    return kernels.run(plan.kernel_sizes, plan.kernel_repeats)


def _push(plan: Plan) -> list[dict[str, Any]]:
    return push.run(
        plan.push_sizes, samples=plan.push_samples, rounds=plan.push_rounds, quick=plan.push_quick
    )


def _concurrency(plan: Plan) -> list[dict[str, Any]]:
    return concurrency.run(
        workers=plan.concurrency_workers,
        parameters=plan.concurrency_parameters,
        seconds=plan.concurrency_seconds,
        rounds=plan.concurrency_rounds,
    )


def _throughput(plan: Plan) -> list[dict[str, Any]]:
    return throughput.run(
        connections=plan.throughput_connections,
        client_processes=plan.throughput_client_processes,
        seconds=plan.throughput_seconds,
        rounds=plan.throughput_rounds,
        latency_samples=plan.throughput_latency_samples,
    )


def _memory(plan: Plan) -> list[dict[str, Any]]:
    return memory.run(
        sessions=plan.memory_sessions,
        parameters=plan.memory_parameters,
        peak_parameters=plan.memory_peak_parameters,
        pushes=plan.memory_pushes,
    )


def _training_modes(plan: Plan) -> list[dict[str, Any]]:
    return training_modes.run(
        workers=plan.training_workers,
        parameters=plan.training_parameters,
        seconds=plan.training_seconds,
        rounds=plan.training_rounds,
    )


def _shards(plan: Plan) -> list[dict[str, Any]]:
    return shards.run(
        shard_counts=plan.shards_counts,
        worker_counts=plan.shards_workers,
        receives=plan.shards_receives,
        parameters=plan.shards_parameters,
        seconds=plan.shards_seconds,
        rounds=plan.shards_rounds,
    )


def _sparse(plan: Plan) -> list[dict[str, Any]]:
    return sparse.run(
        rows=plan.sparse_rows,
        width=plan.sparse_width,
        fractions=plan.sparse_fractions,
        step_repeats=plan.sparse_step_repeats,
        push_samples=plan.sparse_push_samples,
        dense_samples=plan.sparse_dense_samples,
        push_rounds=plan.sparse_push_rounds,
    )


#: The benchmarks, in the order they run.
BENCHMARKS: dict[str, Callable[[Plan], list[dict[str, Any]]]] = {
    "kernels": _kernels,
    "push": _push,
    "concurrency": _concurrency,
    "throughput": _throughput,
    "memory": _memory,
    "training_modes": _training_modes,
    "shards": _shards,
    "sparse": _sparse,
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


#: The push lines per size: figure ("{ours}": our client, marked if it fell back to HTTP),
#: ours, reference (key prefix and name), the ratio's key, and which goal applies where.
_PUSH_LINES: tuple[tuple[str, str, tuple[str, str], str, str | None], ...] = (
    ("p50 {ours} vs TCP echo (ms)", "client_p50", ("echo_p50", "echo"),
     "client_vs_echo_p50", "latency"),
    ("p99 {ours} vs TCP echo (ms)", "client_p99", ("echo_p99", "echo"),
     "client_vs_echo_p99", "latency"),
    ("p50 {ours} out= vs TCP echo (ms)", "client_out_p50", ("echo_p50", "echo"),
     "client_out_vs_echo_p50", None),
    ("p50 our client on HTTP vs TCP echo (ms)", "http_client_p50", ("echo_p50", "echo"),
     "http_client_vs_echo_p50", None),
    ("p50 raw frame client vs TCP echo (ms)", "frames_p50", ("echo_p50", "echo"),
     "frames_vs_echo_p50", None),
    ("p50 {ours} vs raw frame client (ms)", "client_p50", ("frames_p50", "frames"),
     "client_vs_frames_p50", None),
    ("p50 raw HTTP client vs TCP echo (ms)", "raw_p50", ("echo_p50", "echo"),
     "raw_vs_echo_p50", None),
    ("p50 bare uvicorn echo vs TCP echo (ms)", "uvicorn_p50", ("echo_p50", "echo"),
     "uvicorn_vs_echo_p50", None),
    ("p50 raw HTTP client vs bare uvicorn echo (ms)", "raw_p50", ("uvicorn_p50", "uvicorn"),
     "raw_vs_uvicorn_p50", None),
    ("p50 our client on HTTP vs raw HTTP client (ms)", "http_client_p50", ("raw_p50", "raw"),
     "http_client_vs_raw_p50", "http_client"),
    ("p99 raw HTTP client vs TCP echo (ms)", "raw_p99", ("echo_p99", "echo"),
     "raw_vs_echo_p99", None),
    ("p99 our client on HTTP vs raw HTTP client (ms)", "http_client_p99", ("raw_p99", "raw"),
     "http_client_vs_raw_p99", None),
    ("CPU/push {ours}, server+worker vs TCP echo's two ends (ms)", "client_cpu",
     ("echo_cpu", "echo"), "client_cpu_vs_echo", "cpu"),
    ("CPU/push {ours}: server vs echo server (ms)", "client_server_cpu",
     ("echo_server_cpu", "echo"), "client_server_cpu_vs_echo", None),
    ("CPU/push {ours}: worker vs echo client (ms)", "client_worker_cpu",
     ("echo_worker_cpu", "echo"), "client_worker_cpu_vs_echo", None),
    ("CPU/push {ours} out= vs TCP echo (ms)", "client_out_cpu", ("echo_cpu", "echo"),
     "client_out_cpu_vs_echo", None),
    ("CPU/push our client on HTTP vs TCP echo (ms)", "http_client_cpu", ("echo_cpu", "echo"),
     "http_client_cpu_vs_echo", None),
)  # fmt: skip


def _push_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        size = f"{r['parameters']:.0e}"
        # the latency goals are stated for 1e6 and 1e7 parameters, the others for 1e6
        goals = {
            "latency": r["parameters"] in (10**6, 10**7),
            "cpu": r["parameters"] == 10**6,
            "http_client": r["parameters"] == 10**6,
        }
        goal_values = {
            "client_vs_echo_p50": r["goal_client_vs_echo_p50"],
            "client_vs_echo_p99": r["goal_client_vs_echo_p99"],
            "client_cpu_vs_echo": r["goal_cpu_vs_echo"],
            "http_client_vs_raw_p50": r["goal_http_client_vs_raw_p50"],
        }
        ours = "our client"
        if r.get("client_transport", "data plane") != "data plane":
            ours += f" [{r['client_transport']}!]"  # fell back from the data plane
        for figure, key, (ref, ref_name), ratio, goal in _PUSH_LINES:
            out.append(
                _goal(
                    f"push {size} " + figure.format(ours=ours),
                    f"{r[key + '_ms']:.2f}",
                    f"{r[ref + '_ms']:.2f} {ref_name}",
                    r[ratio],
                    goal_values[ratio] if goal is not None and goals[goal] else None,
                )
            )
    return out


def _concurrency_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        who = "our client" if r["mode"] == "data_plane" else "our client on HTTP"
        if r["mode"] == "data_plane" and r["transport"] != "data plane":
            who += f" [{r['transport']}!]"
        out.append(
            _goal(
                f"{r['workers']} workers pushing {r['parameters']:.0e} into 1 session, {who} "
                f"vs {r['workers']} TCP echoes (MB/s)",
                f"{r['ours_bytes_per_s'] / concurrency.MB:.0f}",
                f"{r['echo_bytes_per_s'] / concurrency.MB:.0f} echo",
                r["ratio"],
                r["goal_ratio"],
                at_least=True,
            )
        )
    return out


_LOADS = {"raw_http": "raw HTTP load", "frames": "raw frame load", "client": "our client"}


def _throughput_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("figure", "rate") == "rate":
            load = _LOADS.get(r.get("load", "raw_http"), r.get("load", ""))
            if r.get("load") == "client":
                load += f" x{r['connections']} in {r['client_processes']} processes"
                if r["transport"] != "data plane":
                    load += f" [{r['transport']}!]"
            out.append(
                _goal(
                    f"small pushes/s, {r['connections']} conns, "
                    + ("1 shared session" if r["sessions"] == "shared" else "a session each")
                    + f", {load}",
                    f"{r['ours_per_s']:.0f}",
                    f"{r['echo_per_s']:.0f} echo",
                    r["ratio"],
                    r["goal_ratio"],
                    at_least=True,
                )
            )
            continue
        for name, what, goal in (
            ("client", "our client", r["goal_ratio"]),
            ("frames", "raw frame client", None),
            ("raw_http", "raw HTTP client", None),
            ("http_client", "our client on HTTP", None),
        ):
            if name == "client" and r["transport"] != "data plane":
                what += f" [{r['transport']}!]"
            out.append(
                _goal(
                    f"small push p50, 1 conn, {what} vs FastAPI echo (us)",
                    f"{r[f'{name}_p50_us']:.0f}",
                    f"{r['echo_p50_us']:.0f} echo",
                    r[f"{name}_vs_echo_p50"],
                    goal,
                )
            )
    return out


def _memory_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    mib = memory.MiB
    out = []
    for r in rows:
        over = f" over {r['transport']}" if "transport" in r else ""
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
                    f"RSS kept per client push (idempotency){over} (MiB)",
                    f"{r['rss_per_push'] / mib:.1f}",
                    f"{r['response_bytes'] / mib:.1f} answer",
                    r["rss_per_push"] / r["response_bytes"],
                    None,
                )
            )
        elif r["figure"] == "push_peak":
            out.append(
                _goal(
                    f"peak extra RSS, {r['parameters']:.0e} push{over} (MiB)",
                    f"{r['extra_peak_bytes'] / mib:.1f}",
                    f"{r['request_bytes'] / mib:.1f} body",
                    r["ratio"],
                    r["goal_ratio"],
                )
            )
    return out


def _training_mode_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by_mode = {r["mode"]: r for r in rows}
    sync, asynchronous = by_mode["sync"], by_mode["async"]
    transport = ""
    if {sync["transport"], asynchronous["transport"]} != {"data plane"}:
        transport = f" [{sync['transport']}, {asynchronous['transport']}!]"
    return [
        _goal(
            f"{sync['workers']} workers pushing {sync['parameters']:.0e} into 1 session: sync "
            f"vs async gradients/s{transport} (ratio, reported)",
            f"{sync['gradients_per_s']:.1f}",
            f"{asynchronous['gradients_per_s']:.1f} async",
            sync["sync_vs_async_gradients"],
            None,
        )
    ]


def _shards_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker count: pushes/s of each shard count against one shard, and of one shard
    through the sharded client against the plain client (reported, no goal)."""
    out = []
    for r in rows:
        size = f"{r['parameters']:.0e}"
        who = f"{r['workers']} worker{'s' if r['workers'] != 1 else ''} pushing {size}"
        if r["receive"] == "out":
            who += " with out="
        if r["transport"] != "data plane":
            who += f" [{r['transport']}!]"
        if r["client"] == "sharded" and r["shards"] > 1 and r["vs_one_shard"] is not None:
            out.append(
                _goal(
                    f"{who} into {r['shards']} shards vs 1 shard (pushes/s, reported)",
                    f"{r['pushes_per_s']:.1f}",
                    f"{r['pushes_per_s'] / r['vs_one_shard']:.1f} 1 shard",
                    r["vs_one_shard"],
                    None,
                )
            )
        elif r["client"] == "sharded" and r["shards"] == 1 and r["vs_plain"] is not None:
            out.append(
                _goal(
                    f"{who} into 1 shard, sharded client vs plain Client (pushes/s, reported)",
                    f"{r['pushes_per_s']:.1f}",
                    f"{r['pushes_per_s'] / r['vs_plain']:.1f} plain",
                    r["vs_plain"],
                    None,
                )
            )
    return out


def _sparse_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction of the rows: the exact and lazy steps against the dense kernel pass (and
    the touched rows' share of it), the check of the rows against the dense gradient's
    (information); bytes up and down and p50 of the row pushes against the dense push."""
    out = []
    for r in rows:
        table = f"{r['rows']:.0e}x{r['width']}"
        share = f"{r['fraction'] * 100:g}%" if r["fraction"] is not None else ""
        if r["figure"] == "step":
            out.append(
                _goal(
                    f"sparse step {table}, {share} rows, exact vs dense kernel pass (ms)",
                    f"{r['exact_ms']:.2f}",
                    f"{r['dense_ms']:.2f} dense",
                    r["exact_vs_dense"],
                    r["goal_exact_vs_dense"],
                )
            )
            out.append(
                _goal(
                    f"sparse step {table}, {share} rows, lazy vs touched share of dense pass (ms)",
                    f"{r['lazy_ms']:.3f}",
                    f"{r['share_of_dense_ms']:.3f} share",
                    r["lazy_vs_share"],
                    r["goal_lazy_vs_share"],
                )
            )
            out.append(
                _goal(
                    f"sparse check {table}, {share} rows from a body vs the dense gradient's (ms)",
                    f"{r['prepare_body_ms']:.2f}",
                    f"{r['dense_prepare_ms']:.2f} dense",
                    r["prepare_body_vs_dense_prepare"],
                    None,
                )
            )
        elif r["figure"] == "push" and r["method"] != "dense":
            who = f"sparse push {table}, {share} rows, {r['mode']} [{r['transport']}]"
            dense = f"dense [{_dense_transport(rows)}]"
            out.append(
                _goal(
                    f"{who}: bytes up, {dense} / ours (MB)",
                    f"{r['up_bytes'] / 1e6:.3f}",
                    f"{r['up_bytes'] * r['up_vs_dense'] / 1e6:.1f} dense",
                    r["up_vs_dense"],
                    r["goal_up_vs_dense"],
                    at_least=True,
                )
            )
            out.append(
                _goal(
                    f"{who}: bytes down, {dense} / ours (MB)",
                    f"{r['down_bytes'] / 1e6:.3f}",
                    f"{r['down_bytes'] * r['down_vs_dense'] / 1e6:.1f} dense",
                    r["down_vs_dense"],
                    None,
                    at_least=True,
                )
            )
            out.append(
                _goal(
                    f"{who}: p50 vs {dense} (ms)",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p50_ms'] / r['p50_vs_dense']:.1f} dense",
                    r["p50_vs_dense"],
                    None,
                )
            )
    return out


def _dense_transport(rows: Sequence[dict[str, Any]]) -> str:
    found = [r["transport"] for r in rows if r["figure"] == "push" and r["method"] == "dense"]
    return found[0] if found else "-"


_GOALS: dict[str, Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]]] = {
    "kernels": _kernel_goals,
    "push": _push_goals,
    "concurrency": _concurrency_goals,
    "throughput": _throughput_goals,
    "memory": _memory_goals,
    "training_modes": _training_mode_goals,
    "shards": _shards_goals,
    "sparse": _sparse_goals,
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
    if "concurrency" in results:
        parts.append(
            "concurrent large pushes:\n"
            + push.format_table(results["concurrency"], concurrency.COLUMNS)
        )
    if "throughput" in results:
        parts.append(
            "small pushes (pushes/s; latency in us):\n"
            + throughput.format_rows(results["throughput"])
        )
    if "memory" in results:
        parts.append("memory:\n" + memory.format_rows(results["memory"]))
    if "training_modes" in results:
        parts.append(
            "training modes (a sync step is a round of one gradient per worker):\n"
            + push.format_table(results["training_modes"], training_modes.COLUMNS)
        )
    if "shards" in results:
        parts.append(
            "sharded sessions (pushes/s of all workers; p50 of one push):\n"
            + shards.format_rows(results["shards"])
        )
    if "sparse" in results:
        parts.append(
            "row-sparse pushes of an embedding table:\n" + sparse.format_rows(results["sparse"])
        )
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
