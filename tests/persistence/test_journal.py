"""The write-ahead journal: record framing, torn tails, damage, segment deletion, replay.

Unit tests drive :class:`Journal` and :class:`JournalReader` on a directory; replay tests drive
a service with ``durability="journal"`` in-process (a "crash" drops it without the final
snapshot). A real ``python -m paramserver serve`` SIGKILLed:
``tests/system/test_journal_survives_sigkill.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver.server.persistence import (
    CorruptJournal,
    Journal,
    JournalFailed,
    JournalReader,
    RecoveryError,
)
from paramserver.server.persistence.journal import list_segments
from tests.harness.service import DurableService

RNG = np.random.default_rng(7)


def records_of(directory: Path) -> tuple[list[Any], JournalReader]:
    reader = JournalReader(directory)
    return list(reader.records()), reader


def write_three(directory: Path) -> None:
    journal = Journal(directory, next_lsn=1)
    journal.commit(journal.append("create", "a", body=b"state-of-a", time=1.5))
    journal.commit(journal.append("push", "a", body=b"g" * 100, iterations=1, key="k1", time=2.0))
    journal.commit(journal.append("delete", "a", time=3.0))
    journal.close()


# --- framing -------------------------------------------------------------------------------


def test_records_round_trip(tmp_path: Path) -> None:
    write_three(tmp_path)
    records, reader = records_of(tmp_path)
    assert [(r.lsn, r.op, r.session_id) for r in records] == [
        (1, "create", "a"),
        (2, "push", "a"),
        (3, "delete", "a"),
    ]
    assert bytes(records[0].body) == b"state-of-a" and records[0].time == 1.5
    assert bytes(records[1].body) == b"g" * 100
    assert (records[1].iterations, records[1].key) == (1, "k1")
    assert records[2].body is None and reader.torn is None


def test_every_cut_of_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_three(source)
    segment = list_segments(source)[0][1]
    data = segment.read_bytes()
    records, _ = records_of(source)
    last_starts = records[-1].offset
    for cut in range(last_starts, len(data)):
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(source, copy)
        path = copy / segment.name
        path.write_bytes(data[:cut])
        found, reader = records_of(copy)
        assert [r.lsn for r in found] == [1, 2]
        assert (reader.torn is None) == (cut == last_starts)
        reader.repair()
        assert path.stat().st_size == last_starts
        again, reader = records_of(copy)
        assert [r.lsn for r in again] == [1, 2] and reader.torn is None


def test_damaged_last_record_and_zero_fill_are_torn_tails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_three(tmp_path)
    path = list_segments(tmp_path)[0][1]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # inside the last record
    path.write_bytes(bytes(data) + bytes(4096))  # and a zero-filled extension after it
    found, reader = records_of(tmp_path)
    assert [r.lsn for r in found] == [1, 2] and reader.torn is not None
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        reader.repair()
    assert f"at the end of {path}" in caplog.text and "never acknowledged" in caplog.text
    assert any(tmp_path.glob("*.corrupt"))


def test_damage_before_the_end_refuses(tmp_path: Path) -> None:
    write_three(tmp_path)
    path = list_segments(tmp_path)[0][1]
    records, _ = records_of(tmp_path)
    data = bytearray(path.read_bytes())
    data[records[1].offset + 30] ^= 0x40  # inside the push, with the delete after it
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournal, match=f"{path} is damaged at offset {records[1].offset}"):
        records_of(tmp_path)


def test_a_torn_segment_followed_by_another_is_corruption(tmp_path: Path) -> None:
    write_three(tmp_path)
    first = list_segments(tmp_path)[0][1]
    first.write_bytes(first.read_bytes()[:-3])
    journal = Journal(tmp_path, next_lsn=10)
    journal.commit(journal.append("delete", "b"))
    journal.close()
    with pytest.raises(CorruptJournal, match="later segments follow"):
        records_of(tmp_path)


def test_lsns_must_increase(tmp_path: Path) -> None:
    write_three(tmp_path / "a")
    shutil.copy(list_segments(tmp_path / "a")[0][1], tmp_path / "a" / ("9" * 20 + ".wal"))
    with pytest.raises(CorruptJournal, match="LSN 1 after 3"):
        records_of(tmp_path / "a")


# --- segments, coverage, concurrency -----------------------------------------------------------


def test_segments_rotate_and_only_covered_ones_are_deleted(tmp_path: Path) -> None:
    journal = Journal(tmp_path, next_lsn=1, segment_bytes=100)
    for _ in range(3):
        journal.append("push", "a", body=b"x" * 100, iterations=1)  # LSNs 1, 3, 5
        journal.append("push", "b", body=b"x" * 100, iterations=1)  # LSNs 2, 4, 6
    assert [first for first, _ in list_segments(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]

    def deleted() -> list[int]:
        return [int(p.name.removesuffix(".wal")) for p in journal.truncate()]

    assert deleted() == []  # nothing is covered
    journal.covered("a", journal.last_lsn)
    assert deleted() == [1]  # b needs everything from LSN 2 on
    journal.covered("b", 3)
    assert deleted() == [2, 3]
    journal.covered("b", journal.last_lsn)
    assert deleted() == [4, 5, 6]
    journal.close()
    assert [first for first, _ in list_segments(tmp_path)] == [7]
    assert records_of(tmp_path)[0] == []


def test_a_new_record_after_a_snapshot_keeps_its_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path, next_lsn=1)
    journal.append("push", "a", body=b"1", iterations=1)
    covered_at = journal.last_lsn
    journal.append("push", "a", body=b"2", iterations=2)  # after the snapshot was encoded
    journal.covered("a", covered_at)
    journal.truncate()
    journal.close()
    assert [r.lsn for r in records_of(tmp_path)[0]] == [1, 2]


@pytest.mark.parametrize("policy", ["always", "interval"])
def test_concurrent_appends_get_distinct_lsns_in_order(tmp_path: Path, policy: Any) -> None:
    journal = Journal(tmp_path, next_lsn=1, fsync=policy, fsync_interval_seconds=0.01)
    got: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        for i in range(50):
            lsn = journal.append("push", name, body=b"x" * 64, iterations=i + 1)
            journal.commit(lsn)
            with lock:
                got.append(lsn)

    threads = [threading.Thread(target=work, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    assert sorted(got) == list(range(1, 201))
    records = records_of(tmp_path)[0]
    assert [r.lsn for r in records] == list(range(1, 201))
    for name in ("s0", "s3"):  # each session's records in its own order
        assert [r.iterations for r in records if r.session_id == name] == list(range(1, 51))


# --- replay in-process -------------------------------------------------------------------------


def journaled(durable_services: Callable[..., DurableService], **overrides: Any) -> DurableService:
    return durable_services(durability="journal", **overrides)


def grads() -> dict[str, np.ndarray]:
    return {"w": RNG.standard_normal(6).astype(np.float32)}


WEIGHTS = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}


def test_replay_after_a_crash_is_bit_exact(durable_services: Callable[..., DurableService]) -> None:
    first = journaled(durable_services)
    first.create("a", "nadam", WEIGHTS)
    first.create("b", {"class_name": "Adam", "config": {"amsgrad": True}}, WEIGHTS)
    for _ in range(3):
        first.push("a", grads())
        first.push("b", grads())
    first.durability.snapshot_changed()  # the snapshots cover LSN 8...
    for _ in range(2):
        first.push("a", grads(), key=f"late-{RNG.integers(1 << 30)}")  # ...these come after
    first.crash()

    second = journaled(durable_services)
    assert second.state("a") == first.state("a")
    assert second.state("b") == first.state("b")
    assert second.service.store.get("a").trainer.iterations == 5
    g = grads()
    second.push("a", g)
    trainer = first.service.store.get("a").trainer  # its journal is closed: step it directly
    trainer.apply(trainer.check_gradients(g))
    assert second.state("a") == first.state("a")


def test_snapshot_pass_deletes_covered_segments(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = journaled(durable_services)
    server.create("a", "sgd", WEIGHTS)
    server.push("a", grads())
    journal_dir = tmp_path / "snapshots" / "journal"
    assert len(records_of(journal_dir)[0]) == 2
    server.durability.snapshot_changed()
    assert records_of(journal_dir)[0] == []
    server.push("a", grads())
    server.crash()
    assert [r.op for r in records_of(journal_dir)[0]] == ["push"]
    assert journaled(durable_services).service.store.get("a").trainer.iterations == 2


def test_create_state_load_and_delete_are_replayed(
    durable_services: Callable[..., DurableService],
) -> None:
    first = journaled(durable_services)
    first.create("kept", "adam", WEIGHTS)
    first.create("dropped", "adam", WEIGHTS)
    first.push("kept", grads())
    first.push("dropped", grads())
    exported = first.state("kept")
    first.service.load_state("copy", exported)  # a new session from a state
    first.push("kept", grads())
    first.service.load_state("kept", exported)  # back to the exported state
    first.service.delete("dropped")
    first.crash()

    second = journaled(durable_services)
    assert sorted(s.id for s in second.service.store.list()) == ["copy", "kept"]
    assert second.state("kept") == exported == second.state("copy")


def test_retried_key_after_a_crash_is_replayed_not_applied(
    durable_services: Callable[..., DurableService],
) -> None:
    first = journaled(durable_services)
    first.create("a", "sgd", WEIGHTS)
    g = grads()
    first.push("a", g, key="only-once")
    first.crash()
    second = journaled(durable_services)
    answer, replayed = second.push("a", g, key="only-once")
    assert replayed and answer == {"iterations": 1}
    assert second.service.store.get("a").trainer.iterations == 1


def test_a_gap_in_the_journal_refuses_to_start(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    first = journaled(durable_services)
    first.create("a", "sgd", WEIGHTS)
    first.durability.snapshot_changed()
    for _ in range(3):
        first.push("a", grads())
    first.crash()
    journal_dir = tmp_path / "snapshots" / "journal"
    records = records_of(journal_dir)[0]
    segment = records[1].segment
    data = segment.read_bytes()  # cut out the second push: the third no longer follows on
    segment.write_bytes(data[: records[1].offset] + data[records[2].offset :])
    with pytest.raises(RecoveryError, match="is push number 3 but the session is at iteration 1"):
        journaled(durable_services)


def test_fallback_snapshot_without_its_journal_is_an_error_not_a_refusal(
    durable_services: Callable[..., DurableService],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = journaled(durable_services)
    first.create("a", "sgd", WEIGHTS)
    first.push("a", grads())
    first.durability.snapshot_changed()  # iteration 1
    first.push("a", grads())
    first.durability.snapshot_changed()  # iteration 2; the journal up to here is deleted
    first.push("a", grads())  # iteration 3, only in the journal
    first.crash()
    newest = sorted((tmp_path / "snapshots").glob("a.*.snapshot"))[-1]
    newest.write_bytes(newest.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        second = journaled(durable_services, snapshot_fallback=True)
    assert second.service.store.get("a").trainer.iterations == 1
    assert "refusing snapshot" in caplog.text
    assert "is push number 3 but the session is at iteration 1" in caplog.text


def test_journal_from_an_earlier_run_is_replayed_in_snapshot_mode(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    first = journaled(durable_services)
    first.create("a", "adam", WEIGHTS)
    first.push("a", grads())
    first.crash()
    second = durable_services()  # durability="snapshot"
    assert second.state("a") == first.state("a")
    assert list_segments(tmp_path / "snapshots" / "journal") == []
    second.close()
    # The snapshots' LSN keeps old records from being replayed again.
    third = journaled(durable_services)
    assert third.state("a") == first.state("a")


# --- a failed journal ---------------------------------------------------------------------


def test_a_failed_journal_refuses_every_change(
    durable_services: Callable[..., DurableService], caplog: pytest.LogCaptureFixture
) -> None:
    server = journaled(durable_services)
    server.create("a", "sgd", WEIGHTS)
    journal = server.durability.journal
    assert journal is not None
    os.close(journal._fd)  # the disk goes away: every write now fails
    with caplog.at_level(logging.CRITICAL, logger="paramserver.persistence"):
        with pytest.raises(JournalFailed, match="cannot be written"):
            server.push("a", grads())
    assert "no further change will be acknowledged" in caplog.text
    with pytest.raises(JournalFailed) as refused:
        server.push("a", grads())  # refused before it is applied
    assert refused.value.status == 503 and refused.value.code == "journal_failed"
    assert server.service.store.get("a").trainer.iterations == 0  # write-ahead: never applied
    with pytest.raises(JournalFailed):
        server.create("b", "sgd", WEIGHTS)
    assert server.service.store.find("b") is None
    with pytest.raises(JournalFailed):
        server.service.delete("a")
    journal._fd = os.open(os.devnull, os.O_WRONLY)  # something to close
    server.crash()
