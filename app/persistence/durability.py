"""Keeping a service's sessions on disk: snapshots, the optional journal, recovery at start-up.

:class:`Durability` is what ``--snapshot-dir`` turns on. :meth:`Durability.open` locks the
directory (one server per directory), restores every session from its newest valid snapshot
and replays the journal after it; :meth:`snapshot` saves one session; :meth:`snapshot_changed`
is the periodic pass; :meth:`close` writes the final snapshots and unlocks.

A snapshot is never torn: the state is encoded under the session's lock (pushes wait for that
copy, not for the disk) and written outside it. With ``durability="journal"`` the service
appends every change to :attr:`journal` under the same lock, and each pass deletes the journal
segments that the new snapshots cover.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from paramserver.messages import encode_state

from ..idempotency import IdempotencyCache
from ..sessions import Session, SessionStore
from ..settings import Settings
from .dirlock import DirectoryLock
from .journal import Journal, JournalFailed, JournalReader, list_segments
from .recovery import load_snapshots, replay_journal
from .snapshots import SNAPSHOT_FORMAT, SnapshotStore

__all__ = ["Durability", "SnapshotInfo"]

log = logging.getLogger("paramserver.persistence")

JOURNAL_DIR = "journal"


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot taken: what it holds and where (``file`` is None if a newer one won)."""

    session_id: str
    iterations: int
    lsn: int
    file: Path | None
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "iterations": self.iterations,
            "lsn": self.lsn,
            "file": None if self.file is None else self.file.name,
            "bytes": self.bytes,
        }


def _mark(session: Session) -> tuple[int, int, datetime]:
    """What changes whenever the session's state does (a push, a loaded state)."""
    trainer = session.trainer
    return (id(trainer), trainer.iterations, session.updated_at)


class FinalSnapshotsFailed(RuntimeError):
    """A clean shutdown could not write every final snapshot (the server exits non-zero)."""


class Durability:
    def __init__(self, settings: Settings) -> None:
        if settings.snapshot_dir is None:
            raise ValueError("Durability needs settings.snapshot_dir")
        self.settings = settings
        self.directory = Path(settings.snapshot_dir)
        self.journal_dir = self.directory / JOURNAL_DIR
        self.lock = DirectoryLock(self.directory)
        self.snapshots = SnapshotStore(self.directory, keep=settings.snapshot_keep)
        self.journal: Journal | None = None
        self._store: SessionStore | None = None
        self._idempotency: IdempotencyCache | None = None
        #: Ids of the sessions whose snapshot failed in the last :meth:`snapshot_changed` pass.
        self.last_failed: list[str] = []
        self._base_lsn = 0  # the LSN snapshots record when there is no journal
        self._marks: weakref.WeakKeyDictionary[Session, tuple[int, int, datetime]] = (
            weakref.WeakKeyDictionary()
        )
        #: Told the seconds of each journal fsync and of each snapshot written (/metrics).
        self.observe_fsync: Callable[[float], None] | None = None
        self.observe_snapshot: Callable[[float], None] | None = None

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("Durability.open() was not called")
        return self._store

    @property
    def idempotency(self) -> IdempotencyCache:
        if self._idempotency is None:
            raise RuntimeError("Durability.open() was not called")
        return self._idempotency

    # --- start-up and shutdown ---------------------------------------------------------------

    def open(self, store: SessionStore, idempotency: IdempotencyCache) -> None:
        """Lock the directory, restore the sessions into ``store`` (and their remembered
        idempotency keys into ``idempotency``), open the journal."""
        self.lock.acquire()
        try:
            self._open(store, idempotency)
        except BaseException:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            self.lock.release()
            raise

    def _open(self, store: SessionStore, idempotency: IdempotencyCache) -> None:
        self._store = store
        self._idempotency = idempotency
        started = time.monotonic()
        loaded = load_snapshots(
            self.snapshots, store, idempotency, fallback=self.settings.snapshot_fallback
        )
        for entry in loaded.values():
            self._marks[entry.session] = _mark(entry.session)
        reader = JournalReader(self.journal_dir)
        replayed = replay_journal(reader, store, idempotency, self.snapshots, loaded)
        next_lsn = 1 + max(
            [replayed.last_lsn, *(e.lsn for e in loaded.values())]
            + [first for first, _ in list_segments(self.journal_dir)]
        )
        log.info(
            "restored %d session(s) from snapshots in %s and replayed %d of %d journal "
            "record(s) in %.2f s",
            len(loaded),
            self.directory,
            replayed.applied,
            replayed.records,
            time.monotonic() - started,
        )
        if self.settings.durability == "journal":
            self.journal = Journal(
                self.journal_dir,
                next_lsn=next_lsn,
                fsync=self.settings.journal_fsync,
                fsync_interval_seconds=self.settings.journal_fsync_interval_seconds,
                pending=replayed.pending,
            )
            self.journal.observe_fsync = self.observe_fsync
        else:
            self._base_lsn = next_lsn - 1
        if replayed.applied:
            self.snapshot_changed()  # the next start need not replay the same records again
        elif self.journal is not None:
            self.journal.truncate()
        if self.journal is None and reader.segments and not self._unsaved():
            for _, path in list_segments(self.journal_dir):
                path.unlink()
            log.info("journal replayed into snapshots and removed (durability=snapshot)")

    def _unsaved(self) -> list[Session]:
        return [s for s in self.store.list() if self._marks.get(s) != _mark(s)]

    def close(self) -> None:
        """Snapshot every session changed since its last snapshot, close the journal, unlock.

        Raises :class:`FinalSnapshotsFailed` (after closing and unlocking) when a session's
        final snapshot could not be written: what it holds since its last snapshot is then
        only in the journal, if there is one.
        """
        failed: list[str] = []
        try:
            if self._store is not None:
                written = self.snapshot_changed()
                failed = self.last_failed
                log.info("final snapshots written: %d session(s)", written)
        finally:
            if self.journal is not None:
                self.journal.close()
            self.lock.release()
        if failed:
            kept = (
                "the journal still holds their changes and replays them at the next start"
                if self.settings.durability == "journal"
                else "their changes since the last snapshot are LOST"
            )
            raise FinalSnapshotsFailed(
                f"the final snapshots of {len(failed)} session(s) could not be written "
                f"({', '.join(map(repr, failed[:10]))}{', ...' if len(failed) > 10 else ''}); "
                f"{kept}"
            )

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(self, session: Session, *, only_if_changed: bool = False) -> SnapshotInfo | None:
        """Save ``session``: encoded under its lock, written outside it.

        ``None`` if the session was deleted, or unchanged and ``only_if_changed``.
        """
        if self.journal is not None:
            # After a journal failure the memory may hold a step that was never made durable
            # (its fsync failed): it must not reach disk through a snapshot either.
            self.journal.check()
        started = time.monotonic()
        with session.locked() as trainer:
            if session.deleted:
                return None
            mark = _mark(session)
            if only_if_changed and self._marks.get(session) == mark:
                return None
            reservation = self.snapshots.reserve(session.id)
            lsn = self.journal.last_lsn if self.journal is not None else self._base_lsn
            iterations = trainer.iterations
            header = {
                "format": SNAPSHOT_FORMAT,
                "session_id": session.id,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "session_created_at": session.created_at.isoformat(),
                "session_updated_at": session.updated_at.isoformat(),
                "iterations": iterations,
                "lsn": lsn,
                "idempotency": self.idempotency.export_session(session.id),
            }
            body = encode_state(trainer.state())
        written = self.snapshots.write(reservation, header, body)
        if written is not None:
            if self.observe_snapshot is not None:
                self.observe_snapshot(time.monotonic() - started)
            self._marks[session] = mark
            if self.journal is not None:
                self.journal.covered(session.id, lsn)
        return SnapshotInfo(
            session.id, iterations, lsn, None if written is None else written.path, len(body)
        )

    def snapshot_changed(self) -> int:
        """Snapshot the sessions changed since their last snapshot; returns how many.

        A session whose write fails is logged and retried on the next pass. With a journal,
        the segments now covered by snapshots are deleted.
        """
        written = 0
        failed: list[str] = []
        for session in self.store.list():
            try:
                if self.snapshot(session, only_if_changed=True) is not None:
                    written += 1
            except OSError as exc:
                log.error("snapshot of session %r failed: %s", session.id, exc)
                failed.append(session.id)
            except JournalFailed:
                log.error("snapshots stopped: the journal has failed")
                self.last_failed = [s.id for s in self._unsaved()]
                return written
            except Exception:  # one bad session must not stop the others' snapshots
                log.exception("snapshot of session %r failed", session.id)
                failed.append(session.id)
        self.last_failed = failed
        if self.journal is not None:
            self.journal.truncate()
        return written

    # --- changes the service reports -----------------------------------------------------------

    def created(self, session: Session) -> None:
        """A new session (create, or a state loaded under a free id) must survive a crash.

        Journal: its state as it is now (pushes that slipped in since it was added included)
        is appended under its lock. Otherwise it is snapshotted at once.
        """
        journal = self.journal
        if journal is None:
            self.snapshot(session)
            return
        with session.locked() as trainer:
            if session.deleted:
                return
            lsn = journal.append(
                "create", session.id, body=encode_state(trainer.state()), time=time.time()
            )
        journal.commit(lsn)

    def deleting(self, session: Session) -> None:
        """The service is deleting ``session``; call with its lock held, before the store's
        delete (so that no new session of that id exists yet)."""
        if self.journal is not None:
            self.journal.commit(self.journal.append("delete", session.id, time=time.time()))
        self.snapshots.remove(session.id)
        if self.journal is not None:
            self.journal.forget(session.id)
