"""A key's push digest survives restarts: in snapshots (format 3), in journal records, and
computed from the body for journal records and snapshots written before digests existed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from paramserver import wire
from paramserver.codes import ErrorCode
from paramserver.server.errors import ServiceError
from paramserver.server.persistence.snapshots import (
    SNAPSHOT_FORMAT,
    decode_snapshot,
    encode_snapshot,
)
from tests.harness.service import DurableService

WEIGHTS = {"w": np.zeros(4, np.float32)}
GRADS = {"w": np.ones(4, np.float32)}
OTHER = {"w": np.full(4, 2.0, np.float32)}


def _refused_as_reused(server: DurableService, grads: dict[str, np.ndarray]) -> None:
    with pytest.raises(ServiceError) as info:
        server.push("s", grads, key="k")
    assert info.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert info.value.status == 422


def _snapshot_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.snapshot"))


def test_a_reused_key_is_refused_after_a_restart_from_snapshots(
    durable_services: Callable[..., DurableService],
) -> None:
    first = durable_services()
    first.create("s", "sgd", WEIGHTS)
    first.push("s", GRADS, key="k")
    first.close()  # final snapshot
    header, _ = decode_snapshot(_snapshot_files(first.settings.snapshot_dir)[-1].read_bytes())  # type: ignore[arg-type]
    assert header["format"] == SNAPSHOT_FORMAT == 5
    (entry,) = header["idempotency"]
    assert entry[0] == "k" and entry[1] == 1 and len(entry[3]) == 32
    second = durable_services()
    _refused_as_reused(second, OTHER)
    answer, replayed = second.push("s", GRADS, key="k")
    assert replayed and answer == {"iterations": 1}


def test_a_reused_key_is_refused_after_a_crash_replayed_from_the_journal(
    durable_services: Callable[..., DurableService],
) -> None:
    first = durable_services(durability="journal")
    first.create("s", "sgd", WEIGHTS)
    first.push("s", GRADS, key="k")
    first.crash()  # no final snapshot: the push lives in the journal only
    second = durable_services(durability="journal")
    _refused_as_reused(second, OTHER)
    assert second.push("s", GRADS, key="k") == ({"iterations": 1}, True)


def test_a_journal_record_without_a_digest_gets_one_from_its_body(
    durable_services: Callable[..., DurableService],
) -> None:
    """Records written by paramserver 0.1 carry no digest: replay computes it."""
    first = durable_services(durability="journal")
    first.create("s", "sgd", WEIGHTS)
    journal = first.durability.journal
    assert journal is not None
    lsn = journal.append(
        "push", "s", body=wire.pack({"gradients": GRADS}), iterations=1, key="k", time=time.time()
    )
    journal.commit(lsn)
    first.crash()
    second = durable_services(durability="journal")
    assert second.service.store.get("s").trainer.iterations == 1
    _refused_as_reused(second, OTHER)
    assert second.push("s", GRADS, key="k") == ({"iterations": 1}, True)


def test_keys_of_a_format_2_snapshot_load_without_a_digest_and_match_any_push(
    durable_services: Callable[..., DurableService],
) -> None:
    first = durable_services()
    first.create("s", "sgd", WEIGHTS)
    first.push("s", GRADS, key="k")
    first.close()
    path = _snapshot_files(first.settings.snapshot_dir)[-1]  # type: ignore[arg-type]
    header, body = decode_snapshot(path.read_bytes())
    header["format"] = 2
    header["idempotency"] = [entry[:3] for entry in header["idempotency"]]
    path.write_bytes(b"".join(encode_snapshot(header, bytes(body))))
    second = durable_services()
    assert second.service.store.get("s").trainer.iterations == 1
    # No digest to compare with: the key replays, as it did before digests existed.
    assert second.push("s", OTHER, key="k") == ({"iterations": 1}, True)
    assert second.push("s", OTHER, key="new")[0]["iterations"] == 2
