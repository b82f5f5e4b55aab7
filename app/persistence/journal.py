"""The write-ahead journal: every change to a session, appended before it is acknowledged.

With ``--durability=journal`` each mutation (a session created, a push, a state loaded, a
session deleted) is appended here under the session's lock, right after it succeeded in memory
and before the answer is sent; start-up replays the records that the newest snapshot of each
session does not hold yet, so an acknowledged push survives a crash of the process
(``journal_fsync="always"``: of the machine too).

Layout: ``<snapshot_dir>/journal/<first_lsn>.wal`` segments (20-digit names), each a header
``b"PSJRNL\\r\\n" + u32 format`` followed by records::

    length  u32   bytes of the payload
    crc     u32   zlib.crc32 of payload followed by the 8 LSN bytes
    lsn     u64   log sequence number, increasing across all sessions and segments
    payload       msgpack map: op ("create" | "push" | "round" | "state" | "delete"),
                  session, and per op: body (bin: the state, the push's request body, or a
                  sync round's mean gradient as a push body), iterations (after a push or
                  round), key (the push's Idempotency-Key), digest (hex of the key's push
                  digest, see paramserver.server.idempotency; absent in records of
                  paramserver 0.1, whose digest replay computes from the body), keys (a
                  round: [key, digest hex] of each of its pushes that had a key),
                  time (unix seconds)

All integers are big-endian. Records are written with one ``writev`` under the journal's
lock; ``commit(lsn)`` makes them durable before an answer goes out: "always" fsyncs (one fsync
serves every record appended while the previous one ran: group commit across sessions),
"interval" leaves it to a background thread that fsyncs every few seconds. The kernel keeps
what was written when the process dies, so both policies survive a crash of the server; only
"always" survives a crash of the machine.

Reading (:class:`JournalReader`): an incomplete or damaged record at the very end of the last
segment is a write that a crash interrupted, never acknowledged: it is ignored with a warning
and cut off. Damage anywhere else, or LSNs that do not increase, raise
:class:`CorruptJournal`: the server then refuses to start rather than silently drop
acknowledged pushes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paramserver import wire
from paramserver.codes import ErrorCode

from ..errors import ServiceUnavailable
from .snapshots import fsync_directory

__all__ = [
    "JOURNAL_FORMAT",
    "CorruptJournal",
    "Journal",
    "JournalFailed",
    "JournalReader",
    "Record",
    "list_segments",
]

log = logging.getLogger("paramserver.persistence")

SEGMENT_MAGIC = b"PSJRNL\r\n"
JOURNAL_FORMAT = 1
SEGMENT_SUFFIX = ".wal"
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
OPS = frozenset({"create", "push", "round", "state", "delete"})

_SEGMENT_HEADER = struct.Struct(">8sI")
_FRAME = struct.Struct(">IIQ")  # payload length, crc32, lsn
_LSN = struct.Struct(">Q")
_MAX_PAYLOAD = (1 << 32) - 1


class JournalFailed(ServiceUnavailable):
    """The journal could not be written or synced: no change can be acknowledged any more."""

    code = ErrorCode.JOURNAL_FAILED


class CorruptJournal(RuntimeError):
    """The journal is damaged before its end: replaying past the damage would lose records."""


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(first_lsn, path)`` of every segment, oldest first."""
    out = []
    if directory.is_dir():
        for path in directory.iterdir():
            stem = path.name.removesuffix(SEGMENT_SUFFIX)
            if path.name.endswith(SEGMENT_SUFFIX) and len(stem) == 20 and stem.isdigit():
                out.append((int(stem), path))
    return sorted(out)


@dataclass(frozen=True)
class Record:
    lsn: int
    op: str
    session_id: str
    body: memoryview | None
    iterations: int | None
    key: str | None
    time: float | None
    segment: Path
    offset: int
    digest: bytes | None = None
    #: A round's Idempotency-Keys and their pushes' digests.
    keys: tuple[tuple[str, bytes], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.segment.name} offset {self.offset} (LSN {self.lsn})"


def _write_all(fd: int, chunks: list[Any]) -> None:
    views = [memoryview(c).cast("B") for c in chunks]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class Journal:
    """Appends records to the active segment; rotates, syncs and deletes covered segments.

    It also knows, per session, the first record that no snapshot holds yet (``covered``
    moves that mark when a snapshot is durable), hence which segments may be deleted.
    """

    def __init__(
        self,
        directory: Path,
        *,
        next_lsn: int,
        fsync: Literal["always", "interval"] = "always",
        fsync_interval_seconds: float = 1.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        pending: dict[str, int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.always = fsync == "always"
        #: Told the seconds of every fsync of a commit (/metrics).
        self.observe_fsync: Callable[[float], None] | None = None
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()  # order: _sync_lock before _lock
        self._sync_lock = threading.Lock()
        self._last_lsn = next_lsn - 1
        self._durable = self._last_lsn
        # session id -> LSN of its first record not in a snapshot, and of its last record
        self._pending: dict[str, int] = dict(pending or {})
        self._latest: dict[str, int] = {sid: self._last_lsn for sid in self._pending}
        self._failed: BaseException | None = None
        self._closed_segments = list_segments(self.directory)
        if self._closed_segments and self._closed_segments[-1][0] >= next_lsn:
            raise ValueError("next_lsn must be past every existing segment")
        self._fd = -1
        self._active: tuple[int, Path] = (next_lsn, self.directory / segment_name(next_lsn))
        self._active_size = 0
        self._open_segment(next_lsn)
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if not self.always:
            self._syncer = threading.Thread(
                target=self._sync_periodically,
                args=(fsync_interval_seconds,),
                name="journal-fsync",
                daemon=True,
            )
            self._syncer.start()

    # --- appending ---------------------------------------------------------------------------

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    def check(self) -> None:
        """Raise :class:`JournalFailed` if an earlier write or sync failed."""
        if self._failed is not None:
            raise JournalFailed(
                f"the journal cannot be written ({self._failed}); the server accepts no "
                "changes until it is restarted with a working disk",
            )

    def append(
        self,
        op: str,
        session_id: str,
        *,
        body: bytes | bytearray | memoryview | None = None,
        **fields: Any,
    ) -> int:
        """Append one record; returns its LSN. Durable only after :meth:`commit`."""
        payload: dict[str, Any] = {"op": op, "session": session_id}
        payload.update((k, v) for k, v in fields.items() if v is not None)
        if body is not None:
            payload["body"] = body
        chunks = list(wire.pack_chunks(payload))
        crc = 0
        size = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if size > _MAX_PAYLOAD:
            raise JournalFailed(f"a journal record holds at most {_MAX_PAYLOAD} bytes")
        with self._lock:
            self.check()
            lsn = self._last_lsn + 1
            frame = _FRAME.pack(size, zlib.crc32(_LSN.pack(lsn), crc), lsn)
            try:
                _write_all(self._fd, [frame, *chunks])
            except OSError as exc:
                self._fail(exc)
                raise JournalFailed(f"the journal cannot be written: {exc}") from None
            self._last_lsn = lsn
            self._active_size += _FRAME.size + size
            self._pending.setdefault(session_id, lsn)
            self._latest[session_id] = lsn
            if self._active_size >= self.segment_bytes:
                self._rotate()
        return lsn

    def commit(self, lsn: int) -> None:
        """Return once record ``lsn`` is as durable as the policy promises (fsync if "always")."""
        if not self.always or self._durable >= lsn:
            return
        self._sync(lsn)

    def _sync(self, lsn: int) -> None:
        with self._sync_lock:
            if self._durable >= lsn:
                return  # another thread's fsync covered it: group commit
            with self._lock:
                self.check()
                target = self._last_lsn
                fd = os.dup(self._fd)  # a rotation may close self._fd meanwhile
            started = time.monotonic()
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._fail(exc)
                raise JournalFailed(f"the journal cannot be synced: {exc}") from None
            finally:
                os.close(fd)
            if self.observe_fsync is not None:
                self.observe_fsync(time.monotonic() - started)
            self._durable = max(self._durable, target)

    def _sync_periodically(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._durable < self._last_lsn:
                try:
                    self._sync(self._last_lsn)
                except JournalFailed:
                    return

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            log.critical(
                "journal write failed (%s): no further change will be acknowledged; "
                "fix the disk and restart the server (it replays what reached the journal)",
                exc,
            )

    # --- segments ------------------------------------------------------------------------------

    def _open_segment(self, first_lsn: int) -> None:
        path = self.directory / segment_name(first_lsn)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, [_SEGMENT_HEADER.pack(SEGMENT_MAGIC, JOURNAL_FORMAT)])
            os.fsync(fd)
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._active = (first_lsn, path)
        self._active_size = _SEGMENT_HEADER.size

    def _rotate(self) -> None:
        """Close the active segment (synced) and start the next; hold ``_lock``."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._fail(exc)
            raise JournalFailed(f"the journal cannot be synced: {exc}") from None
        os.close(self._fd)
        self._durable = max(self._durable, self._last_lsn)
        self._closed_segments.append(self._active)
        self._open_segment(self._last_lsn + 1)

    def covered(self, session_id: str, lsn: int) -> None:
        """A snapshot of ``session_id`` holding every record up to ``lsn`` is durable."""
        with self._lock:
            if session_id not in self._pending:
                return
            if self._latest.get(session_id, 0) <= lsn:
                del self._pending[session_id]
                self._latest.pop(session_id, None)
            else:
                self._pending[session_id] = max(self._pending[session_id], lsn + 1)

    def forget(self, session_id: str) -> None:
        """The session is deleted and its snapshots removed: its records are needed no more."""
        with self._lock:
            self._pending.pop(session_id, None)
            self._latest.pop(session_id, None)

    def truncate(self) -> list[Path]:
        """Delete the segments whose records are all held by snapshots; returns their paths."""
        with self._lock:
            if self._failed is not None:
                return []  # keep everything for the restart to replay
            needed = min(self._pending.values(), default=self._last_lsn + 1)
            if self._last_lsn >= self._active[0] and self._last_lsn < needed:
                self._rotate()  # the active segment is covered: close it so it can go
            firsts = [first for first, _ in self._closed_segments] + [self._active[0]]
            doomed = []
            for index, (_, path) in enumerate(self._closed_segments):
                if firsts[index + 1] > needed:  # it holds LSNs up to the next one's first - 1
                    break
                doomed.append(path)
            self._closed_segments = self._closed_segments[len(doomed) :]
        for path in doomed:  # oldest first, each removal durable before the next
            path.unlink(missing_ok=True)
            fsync_directory(self.directory)
        return doomed

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=10)
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return
            try:
                if self._failed is None:
                    os.fdatasync(self._fd)
                    self._durable = self._last_lsn
            finally:
                os.close(self._fd)
                self._fd = -1


def _valid_record_follows(data: bytes, view: memoryview, start: int) -> bool:
    """Whether a whole record with a valid checksum starts at any offset from ``start`` on."""
    size = len(data)
    if data.count(0, start) == size - start:  # zeros (or nothing): a zero-filled file end
        return False
    for pos in range(start, size - _FRAME.size + 1):
        length, crc, lsn = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length == 0 or end > size:
            continue
        if zlib.crc32(_LSN.pack(lsn), zlib.crc32(view[pos + _FRAME.size : end])) == crc:
            return True
    return False


class JournalReader:
    """Every record of a journal directory in LSN order, with the torn-tail rule applied.

    Iterate :meth:`records` once; then ``torn`` says whether the last segment ended in an
    interrupted write and :meth:`repair` cuts it off so that new segments follow clean data.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.segments = list_segments(self.directory)
        self.last_lsn = 0
        self.torn: tuple[Path, int, int, str] | None = None  # path, offset, bytes, reason

    def records(self) -> Iterator[Record]:
        for index, (_, path) in enumerate(self.segments):
            last = index == len(self.segments) - 1
            yield from self._segment(path, path.read_bytes(), last=last)

    def _damaged(self, path: Path, data: bytes, pos: int, reason: str, *, last: bool) -> None:
        """An unreadable record at ``pos``: a torn tail if nothing follows, else corruption."""
        if last:
            self.torn = (path, pos, len(data) - pos, reason)
            return
        raise CorruptJournal(
            f"journal segment {path} is damaged at offset {pos} ({reason}) and later segments "
            "follow it; refusing to start so that no acknowledged change is dropped. See "
            "docs/durability.md, 'Recovery by hand'."
        )

    def _segment(self, path: Path, data: bytes, *, last: bool) -> Iterator[Record]:
        size = len(data)
        if size < _SEGMENT_HEADER.size:
            self._damaged(path, data, 0, "the segment header is cut short", last=last)
            return
        magic, version = _SEGMENT_HEADER.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC or version != JOURNAL_FORMAT:
            raise CorruptJournal(
                f"{path} is not a paramserver journal segment of format {JOURNAL_FORMAT}"
            )
        view = memoryview(data)
        pos = _SEGMENT_HEADER.size
        while pos < size:
            if size - pos < _FRAME.size:
                self._damaged(path, data, pos, "a record frame is cut short", last=last)
                return
            length, crc, lsn = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + length
            if end > size:
                if _valid_record_follows(data, view, pos + 1):
                    raise CorruptJournal(
                        f"journal segment {path} is damaged at offset {pos} (a record's length "
                        "runs past the end, with valid records after it); refusing to start so "
                        "that no acknowledged change is dropped. See docs/durability.md, "
                        "'Recovery by hand'."
                    )
                self._damaged(path, data, pos, "a record runs past the end", last=last)
                return
            payload = view[pos + _FRAME.size : end]
            if zlib.crc32(_LSN.pack(lsn), zlib.crc32(payload)) != crc:
                # A power loss can leave the last record full-length with a bad checksum (its
                # pages written out of order), followed by zeros or nothing. Only a valid record
                # after it proves that the damage is not such a torn write.
                if not _valid_record_follows(data, view, end):
                    self._damaged(path, data, pos, "checksum mismatch", last=last)
                    return
                raise CorruptJournal(
                    f"journal segment {path} is damaged at offset {pos} (checksum mismatch, "
                    "with records after it); refusing to start so that no acknowledged change "
                    "is dropped. See docs/durability.md, 'Recovery by hand'."
                )
            if lsn <= self.last_lsn:
                raise CorruptJournal(
                    f"journal segment {path} offset {pos}: LSN {lsn} after {self.last_lsn}"
                )
            record = _decode(payload, lsn, path, pos)
            self.last_lsn = lsn
            yield record
            pos = end

    def repair(self) -> None:
        """Cut off a torn tail found by :meth:`records` (durably)."""
        if self.torn is None:
            return
        path, offset, nbytes, reason = self.torn
        # Keep what is cut: a torn write was never acknowledged, but the bytes are evidence if
        # the damage was something else.
        aside = path.with_name(f"{path.name}.{offset}.corrupt")
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        with open(aside, "wb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        log.error(
            "journal: %d damaged bytes at the end of %s from offset %d (%s), with no valid "
            "record after them: taken for a write that a crash interrupted (never "
            "acknowledged) and cut off; a copy is kept as %s",
            nbytes,
            path,
            offset,
            reason,
            aside,
        )
        if offset < _SEGMENT_HEADER.size:
            path.unlink()
        else:
            with open(path, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        fsync_directory(path.parent)


def _decode(payload: memoryview, lsn: int, path: Path, offset: int) -> Record:
    where = f"journal segment {path} offset {offset} (LSN {lsn})"
    try:
        obj = wire.unpack(payload)
    except wire.MalformedBody as exc:
        raise CorruptJournal(f"{where}: unreadable record: {exc}") from None
    if not isinstance(obj, dict) or obj.get("op") not in OPS:
        raise CorruptJournal(f"{where}: not a journal record")
    session_id = obj.get("session")
    body = obj.get("body")
    iterations = obj.get("iterations")
    key = obj.get("key")
    time = obj.get("time")
    digest_hex = obj.get("digest")
    digest = _digest(digest_hex)
    keys = _keys(obj.get("keys"))
    if (
        not isinstance(session_id, str)
        or not (body is None or isinstance(body, memoryview))
        or not (iterations is None or isinstance(iterations, int))
        or not (key is None or isinstance(key, str))
        or not (time is None or isinstance(time, (int, float)))
        or (obj["op"] != "delete" and body is None)
        or (obj["op"] in ("push", "round") and iterations is None)
        or (digest_hex is not None and digest is None)
        or keys is None
    ):
        raise CorruptJournal(f"{where}: a {obj['op']!r} record with missing or wrong fields")
    return Record(
        lsn, obj["op"], session_id, body, iterations, key, time, path, offset, digest, keys
    )


def _keys(value: object) -> tuple[tuple[str, bytes], ...] | None:
    """A round record's ``keys``: ``[[key, digest hex], ...]``, or None if malformed."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        digest = _digest(item[1])
        if digest is None:
            return None
        out.append((item[0], digest))
    return tuple(out)


def _digest(value: object) -> bytes | None:
    """A push digest from its hex form (32 hex digits), or None if it is not one."""
    if not isinstance(value, str) or len(value) != 32:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None
