"""A damaged journal tail: cut when nothing valid follows it (a torn write), with a copy of
what is cut and an ERROR; refused when a valid record follows (that is corruption)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from paramserver.server.persistence import CorruptJournal, Journal, JournalReader
from paramserver.server.persistence.journal import list_segments


def write(directory: Path, count: int) -> Path:
    journal = Journal(directory, next_lsn=1)
    for i in range(count):
        journal.commit(journal.append("push", "a", body=b"g" * 64, iterations=i + 1, time=1.0))
    journal.close()
    return list_segments(directory)[0][1]


def read(directory: Path) -> tuple[list[int], JournalReader]:
    reader = JournalReader(directory)
    return [r.lsn for r in reader.records()], reader


@pytest.mark.parametrize("after", [b"", bytes(4096), b"\x17garbage that is no record\x99" * 20])
def test_a_damaged_last_record_is_cut_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, after: bytes
) -> None:
    path = write(tmp_path, 3)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last record: full length, bad checksum
    path.write_bytes(bytes(data) + after)
    lsns, reader = read(tmp_path)
    assert lsns == [1, 2] and reader.torn is not None
    _, offset, nbytes, _ = reader.torn
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        reader.repair()
    (record,) = [r for r in caplog.records if "damaged bytes at the end" in r.getMessage()]
    assert record.levelno == logging.ERROR
    aside = path.with_name(f"{path.name}.{offset}.corrupt")
    assert str(aside) in record.getMessage()
    assert (
        aside.read_bytes() == (bytes(data) + after)[offset:] and len(aside.read_bytes()) == nbytes
    )
    assert path.stat().st_size == offset
    # The copy is not a segment: the journal reads clean afterwards.
    assert read(tmp_path)[0] == [1, 2]
    assert [p for _, p in list_segments(tmp_path)] == [path]


def test_a_damaged_record_with_a_valid_one_after_it_refuses(tmp_path: Path) -> None:
    path = write(tmp_path, 3)
    data = bytearray(path.read_bytes())
    lsns_offsets = [r.offset for r in JournalReader(tmp_path).records()]
    data[lsns_offsets[1] + 20] ^= 0x40  # the second record; the third, valid, follows
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournal, match="with records after it"):
        read(tmp_path)


def test_a_valid_record_after_garbage_after_the_damage_still_refuses(tmp_path: Path) -> None:
    source = tmp_path / "source"
    path = write(source, 3)
    data = bytearray(path.read_bytes())
    offsets = [r.offset for r in JournalReader(source).records()]
    damaged = bytes(data[: offsets[1]]) + b"\x01" * 7 + bytes(data[offsets[1] :])
    target = tmp_path / "target"
    target.mkdir()
    (target / path.name).write_bytes(damaged)
    with pytest.raises(CorruptJournal):
        read(target)
