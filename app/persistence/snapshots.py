"""Snapshot files: one session's whole state, written crash-safely, verified when read.

File layout (all integers big-endian)::

    magic      8 bytes   b"PSSNAP\\r\\n"
    format     u32       SNAPSHOT_FORMAT (5; formats 1 to 4 are still read)
    H          u32       length of the header
    header     H bytes   UTF-8 JSON: format, session_id, created_at, iterations, lsn,
                         session_created_at, session_updated_at, idempotency
    B          u64       length of the body
    body       B bytes   the state exactly as ``paramserver.messages.encode_state`` encodes it
    sha256     32 bytes  of every byte before it

A file is written to ``<name>.tmp`` in the same directory, flushed and fsynced, renamed over
its final name (``os.replace`` is atomic) and the directory is fsynced, so after a crash a
snapshot is either absent or whole. A file that is short, long, of another format or whose
checksum does not match is refused by :func:`read_snapshot` with the reason. Nothing is ever
unpickled: the body is msgpack read by :mod:`paramserver.wire`.

Files are named ``<session_id>.<seq>.snapshot`` with ``seq`` a 16-digit counter that grows
across all sessions of the directory; the newest file of a session has the largest ``seq``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver.codes import SESSION_ID_PATTERN

__all__ = [
    "SNAPSHOT_FORMAT",
    "CorruptSnapshot",
    "Reservation",
    "SnapshotFile",
    "SnapshotStore",
    "encode_snapshot",
    "fsync_directory",
    "read_snapshot",
]

log = logging.getLogger("paramserver.persistence")

MAGIC = b"PSSNAP\r\n"
#: The format written. 5: the state body may carry ``sparse_updates`` (absent: "exact", as
#: in every earlier format). 4: the state body may carry the session's ``training`` mode and
#: ``constraints`` (absent: asynchronous, none, as in every earlier format). 3: each
#: remembered Idempotency-Key carries its push's digest (``[key, iterations, expires_at,
#: digest_hex]``). 2: the state body carries ``refuse_non_finite`` and may hold non-finite
#: weights and slots; keys are ``[key, iterations, expires_at]``. 1 (paramserver 0.1): as 2
#: without ``refuse_non_finite``.
#: All five are read.
SNAPSHOT_FORMAT = 5
READABLE_FORMATS = (1, 2, 3, 4, 5)
SUFFIX = ".snapshot"
CORRUPT_SUFFIX = ".corrupt"
TMP_SUFFIX = ".tmp"
_PREFIX = struct.Struct(">8sII")  # magic, format, header length
_BODY_LENGTH = struct.Struct(">Q")
_DIGEST_SIZE = hashlib.sha256().digest_size
_MAX_HEADER = 256 * 1024 * 1024  # the idempotency keys of one session fit easily
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


class CorruptSnapshot(ValueError):
    """A snapshot file that cannot be trusted: truncated, altered or of an unknown format."""


def fsync_directory(directory: Path) -> None:
    """Make a rename, creation or removal in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_snapshot(header: dict[str, Any], body: bytes) -> list[bytes]:
    """The pieces of a snapshot file, checksum last; the format is ``header["format"]``."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    pieces = [
        _PREFIX.pack(MAGIC, int(header.get("format", SNAPSHOT_FORMAT)), len(head)),
        head,
        _BODY_LENGTH.pack(len(body)),
        body,
    ]
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    pieces.append(digest.digest())
    return pieces


def read_snapshot(path: Path) -> tuple[dict[str, Any], memoryview]:
    """The header and the body of a snapshot file; :class:`CorruptSnapshot` says why not."""
    data = Path(path).read_bytes()
    return decode_snapshot(data)


def decode_snapshot(data: bytes) -> tuple[dict[str, Any], memoryview]:
    size = len(data)
    if size < _PREFIX.size:
        raise CorruptSnapshot(f"truncated: {size} bytes, shorter than the file's prefix")
    magic, version, head_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptSnapshot("not a paramserver snapshot (wrong magic bytes)")
    if version not in READABLE_FORMATS:
        raise CorruptSnapshot(
            f"snapshot format {version}; this server reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    if head_len > _MAX_HEADER:
        raise CorruptSnapshot(f"header length {head_len} is implausible")
    body_at = _PREFIX.size + head_len + _BODY_LENGTH.size
    if size < body_at + _DIGEST_SIZE:
        raise CorruptSnapshot(f"truncated: {size} bytes, the header alone needs {body_at}")
    (body_len,) = _BODY_LENGTH.unpack_from(data, body_at - _BODY_LENGTH.size)
    expected = body_at + body_len + _DIGEST_SIZE
    if size != expected:
        kind = "truncated" if size < expected else "trailing bytes"
        raise CorruptSnapshot(f"{kind}: {size} bytes, the file's lengths say {expected}")
    view = memoryview(data)
    if hashlib.sha256(view[: expected - _DIGEST_SIZE]).digest() != data[expected - _DIGEST_SIZE :]:
        raise CorruptSnapshot("checksum mismatch: the file was altered or damaged")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
    except ValueError as exc:  # checksummed, so only a writer's bug gets here
        raise CorruptSnapshot(f"unreadable header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != version:
        raise CorruptSnapshot("the header is not a snapshot header of this format")
    return header, view[body_at : body_at + body_len]


@dataclass(frozen=True, order=True)
class SnapshotFile:
    seq: int
    session_id: str = field(compare=False)
    path: Path = field(compare=False)


def parse_name(name: str) -> tuple[str, int] | None:
    """``(session_id, seq)`` of a snapshot file name, or ``None`` for any other file."""
    if not name.endswith(SUFFIX):
        return None
    stem = name[: -len(SUFFIX)]
    session_id, dot, seq = stem.rpartition(".")
    if not dot or len(seq) != 16 or not seq.isdigit():
        return None
    if not _SESSION_ID.fullmatch(session_id):
        return None
    return session_id, int(seq)


def file_name(session_id: str, seq: int) -> str:
    return f"{session_id}.{seq:016d}{SUFFIX}"


@dataclass
class _Files:
    """What the store knows of one session's files; ``kept`` and ``written`` under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    kept: list[SnapshotFile] = field(default_factory=list)  # oldest first
    written: int = 0  # seq of the newest file written
    removed: bool = False  # the session was deleted: its pending writes are dropped


@dataclass(frozen=True)
class Reservation:
    """A sequence number taken for one session's snapshot, to pass to :meth:`write`."""

    session_id: str
    seq: int
    files: _Files


class SnapshotStore:
    """The snapshot files of one directory: write, keep the last ``keep``, list, remove.

    A writer takes a :meth:`reserve`-ation (under the session's lock, when it encodes the
    state) and :meth:`write`-s the file later, outside that lock. :meth:`write` drops a file
    older than one already written for the session, or reserved before the session was
    removed: writers that race never leave an older state as the newest file, nor bring back
    a deleted session.
    """

    def __init__(self, directory: Path, *, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self._seq = 0
        self._lock = threading.Lock()
        self._files: dict[str, _Files] = {}

    def _entry(self, session_id: str) -> _Files:
        entry = self._files.get(session_id)
        if entry is None:
            entry = self._files[session_id] = _Files()
        return entry

    def reserve(self, session_id: str) -> Reservation:
        with self._lock:
            self._seq += 1
            return Reservation(session_id, self._seq, self._entry(session_id))

    def scan(self) -> dict[str, list[SnapshotFile]]:
        """Every session's snapshot files, newest first; removes leftover temporary files.

        Call once, before any write: it also sets the sequence counter past every file found.
        """
        found: dict[str, list[SnapshotFile]] = {}
        highest = 0
        for path in self.directory.iterdir():
            name = path.name
            if name.endswith(TMP_SUFFIX):
                log.info("removing %s, a snapshot left unfinished by a crash", path)
                path.unlink(missing_ok=True)
                continue
            parsed = parse_name(name.removesuffix(CORRUPT_SUFFIX))
            if parsed is None:
                continue
            session_id, seq = parsed
            highest = max(highest, seq)
            if not name.endswith(CORRUPT_SUFFIX):
                found.setdefault(session_id, []).append(SnapshotFile(seq, session_id, path))
        with self._lock:
            self._seq = max(self._seq, highest)
            for session_id, files in found.items():
                files.sort(reverse=True)
                entry = self._entry(session_id)
                entry.kept = sorted(files)
                entry.written = files[0].seq
        return found

    def set_aside(self, snapshot: SnapshotFile) -> Path:
        """Rename a refused file to ``*.corrupt`` (kept for inspection, never loaded again)."""
        target = snapshot.path.with_name(snapshot.path.name + CORRUPT_SUFFIX)
        os.replace(snapshot.path, target)
        with self._lock:
            entry = self._entry(snapshot.session_id)
        with entry.lock:
            entry.kept = [f for f in entry.kept if f.seq != snapshot.seq]
        return target

    def write(
        self, reservation: Reservation, header: dict[str, Any], body: bytes
    ) -> SnapshotFile | None:
        """Write one snapshot crash-safely; ``None`` if a newer one (or a deletion) won.

        Older files of the session beyond the last ``keep`` are removed afterwards.
        """
        entry = reservation.files
        with entry.lock:
            if entry.removed or reservation.seq <= entry.written:
                return None
            path = self.directory / file_name(reservation.session_id, reservation.seq)
            self._write_file(path, encode_snapshot(header, body))
            snapshot = SnapshotFile(reservation.seq, reservation.session_id, path)
            entry.written = reservation.seq
            entry.kept.append(snapshot)
            while len(entry.kept) > self.keep:
                entry.kept.pop(0).path.unlink(missing_ok=True)
            return snapshot

    def _write_file(self, path: Path, pieces: Iterable[bytes]) -> None:
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            with open(tmp, "xb") as f:
                for piece in pieces:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)

    def remove(self, session_id: str) -> None:
        """Delete every snapshot of ``session_id``; writes reserved before now are dropped.

        The caller makes sure no new session of that id exists yet (it holds the session's
        lock and removes the session from the store afterwards).
        """
        with self._lock:
            entry = self._files.pop(session_id, None)
        if entry is None:
            entry = _Files()
        with entry.lock:  # waits for a write in progress, whose file is removed below
            entry.removed = True
            entry.kept = []
            removed = False
            # Session ids are [A-Za-z0-9._-]: nothing glob would interpret.
            for path in self.directory.glob(f"{session_id}.*{SUFFIX}*"):
                parsed = parse_name(path.name.removesuffix(CORRUPT_SUFFIX))
                if parsed is not None and parsed[0] == session_id:
                    path.unlink(missing_ok=True)
                    removed = True
            if removed:
                fsync_directory(self.directory)
