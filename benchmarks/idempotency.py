"""What an Idempotency-Key costs a push: its digest, and the push with a key against without.

In process, for each size (one float32 parameter, Adam): the median time of
``push_digest`` on the decoded gradients, and of ``SessionService.push`` (decode, digest when
keyed, step, encode the answer with the weights) with a fresh key per push and with none,
sampled in turn over rounds so that machine load hits both alike. The ratio keyed / unkeyed
is the key's whole cost (digest plus bookkeeping); the client sends a key with every push.

Run ``python -m benchmarks.idempotency`` (``--sizes``, ``--rounds``); it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Sequence

import numpy as np

from paramserver import wire
from paramserver.messages import decode_push
from paramserver.server.idempotency import push_digest
from tests.harness.service import plain_service


def measure(size: int, rounds: int, pushes: int) -> dict[str, float]:
    service = plain_service(idempotency_max_bytes=0)  # answers are not kept: bytes not measured
    weights = {"w": np.zeros(size, np.float32)}
    service.create(
        wire.pack({"session_id": "b", "optimizer": "adam", "weights": weights}), "msgpack"
    )
    session = service.store.get("b")
    body = wire.pack({"gradients": {"w": np.full(size, 1e-3, np.float32)}})
    decoded = decode_push(body, service.limits)
    digest_times: list[float] = []
    keyed: list[float] = []
    plain: list[float] = []
    for _ in range(rounds):
        for _ in range(pushes):
            start = time.perf_counter()
            push_digest(decoded)
            digest_times.append(time.perf_counter() - start)
        for samples, with_key in ((keyed, True), (plain, False)):
            for _ in range(pushes):
                key = uuid.uuid4().hex if with_key else None
                start = time.perf_counter()
                service.push(session, body, return_weights=True, idempotency_key=key)
                samples.append(time.perf_counter() - start)
    return {
        "digest_ms": statistics.median(digest_times) * 1e3,
        "keyed_ms": statistics.median(keyed) * 1e3,
        "plain_ms": statistics.median(plain) * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pushes", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"# Idempotency-Key cost per push (in process; load {os.getloadavg()[0]:.2f})\n")
    print("| parameters | digest ms | push with key ms | push without ms | with / without |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(
            size, args.rounds, max(1, args.pushes if size <= 1_000_000 else args.pushes // 4)
        )
        print(
            f"| {size:,} | {r['digest_ms']:.3f} | {r['keyed_ms']:.2f} | {r['plain_ms']:.2f} | "
            f"{r['keyed_ms'] / r['plain_ms']:.3f}x |"
        )


if __name__ == "__main__":
    main()
