"""Start-up: load every session's newest valid snapshot, then replay the journal after it.

Rules (docs/durability.md says the same for operators):

* Snapshots: for each session the newest file that passes every check (lengths, checksum,
  header, a state that rebuilds a trainer) is loaded. A refused file is logged at WARNING with
  its name and the reason, renamed to ``*.corrupt`` and the previous one is tried. A session
  none of whose files can be loaded is logged at ERROR and not restored.
* Journal: records are replayed in LSN order, each only if its LSN is above the LSN of the
  snapshot loaded for its session; pushes go through the same engine as live pushes (so the
  result is bit-exact) and their Idempotency-Keys are remembered again. A push must continue
  its session's iteration count exactly; if it does not, the server refuses to start, except
  for a session whose newest snapshot was refused (then the journal may no longer hold what
  followed the older snapshot: that session is logged at ERROR, stays at the state reached,
  and ignores pushes until a later state record).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

from paramserver.codes import MessageError
from paramserver.messages import ANSWER_LIMITS, decode_push, decode_push_message, decode_state

from ..errors import ServiceError
from ..idempotency import IdempotencyCache, push_digest
from ..optim import GradientError, StateError
from ..sessions import Session, SessionStore
from ..training import Trainer, restore_trainer, with_sum_squares
from .journal import JournalReader, Record
from .snapshots import CorruptSnapshot, SnapshotFile, SnapshotStore, read_snapshot

__all__ = ["Loaded", "RecoveryError", "Replayed", "load_snapshots", "replay_journal"]

log = logging.getLogger("paramserver.persistence")

#: Limits for reading our own checksummed files: they bound nothing a client sent.
TRUSTED_LIMITS = ANSWER_LIMITS


class RecoveryError(RuntimeError):
    """The saved state cannot be restored without losing acknowledged changes."""


@dataclass
class Loaded:
    """A session restored from a snapshot."""

    session: Session
    snapshot: SnapshotFile
    lsn: int
    fallback: bool  # a newer snapshot of this session was refused


def _buffer(view: memoryview) -> bytes:
    """A zero-copy view typed for the protocol's parsers (they read any buffer)."""
    return cast(bytes, view)


def _same(trainer: Trainer) -> Trainer:
    return trainer


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, (ServiceError, MessageError)) else str(exc)


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def load_snapshots(
    store: SnapshotStore,
    sessions: SessionStore,
    idempotency: IdempotencyCache,
    *,
    fallback: bool = False,
) -> dict[str, Loaded]:
    """Restore every session of the directory from its newest snapshot.

    A newest snapshot that cannot be loaded is set aside (``.corrupt``) and stops the start-up
    (:class:`RecoveryError`), unless ``fallback``: then the previous one is loaded, at ERROR.
    """
    loaded: dict[str, Loaded] = {}
    for session_id, files in sorted(store.scan().items()):
        for index, snapshot in enumerate(files):
            try:
                header, body = read_snapshot(snapshot.path)
                if header.get("session_id") != session_id:
                    raise CorruptSnapshot(f"it holds session {header.get('session_id')!r}")
                state = decode_state(_buffer(body), TRUSTED_LIMITS)
                trainer = restore_trainer(state)
                del body, state
            except (CorruptSnapshot, ServiceError, MessageError, StateError, GradientError) as exc:
                more = index + 1 < len(files)
                aside = store.set_aside(snapshot)
                if not fallback:
                    # Never come back silently older: what only this file held (pushes that
                    # were acknowledged) would be gone.
                    raise RecoveryError(
                        f"session {session_id!r}: its newest snapshot {snapshot.path} cannot "
                        f"be loaded ({_reason(exc)}); kept as {aside}. Refusing to start: "
                        "loading an older snapshot would silently lose what this one held. "
                        "Start with --snapshot-fallback to load the previous snapshot "
                        "instead (see docs/durability.md, 'Recovery by hand')."
                    ) from None
                log.error(
                    "refusing snapshot %s: %s; %s (kept as %s)",
                    snapshot.path,
                    _reason(exc),
                    "using the previous one (--snapshot-fallback)"
                    if more
                    else "no older snapshot of this session is left",
                    aside,
                )
                continue
            try:
                session = sessions.add(session_id, functools.partial(_same, trainer))
            except ServiceError as exc:
                raise RecoveryError(
                    f"cannot restore session {session_id!r} from {snapshot.path}: {exc.message}"
                ) from None
            session.created_at = _parse_time(header.get("session_created_at")) or session.created_at
            session.updated_at = _parse_time(header.get("session_updated_at")) or session.updated_at
            for entry in header.get("idempotency", []):
                # (key, iterations, expires_at[, digest hex]): format 3 adds the digest
                key, iterations, expires_at = entry[:3]
                digest = bytes.fromhex(entry[3]) if len(entry) > 3 and entry[3] else None
                idempotency.restore(session_id, key, iterations, expires_at, digest)
            lsn = header.get("lsn", 0)
            loaded[session_id] = Loaded(session, snapshot, int(lsn), fallback=index > 0)
            break
        else:
            log.error(
                "session %r: none of its %d snapshot(s) could be loaded; it is not restored",
                session_id,
                len(files),
            )
    return loaded


@dataclass
class Replayed:
    """What a journal replay did."""

    records: int = 0  # records read
    applied: int = 0  # records applied (above their session's snapshot)
    last_lsn: int = 0
    pending: dict[str, int] = field(default_factory=dict)  # session -> first record applied


class _Replay:
    def __init__(
        self,
        store: SessionStore,
        idempotency: IdempotencyCache,
        snapshots: SnapshotStore,
        loaded: dict[str, Loaded],
    ) -> None:
        self.store = store
        self.idempotency = idempotency
        self.snapshots = snapshots
        self.snapshot_lsn = {sid: entry.lsn for sid, entry in loaded.items()}
        self.lossy = {sid for sid, entry in loaded.items() if entry.fallback}
        self.ignoring: set[str] = set()  # lossy sessions whose journal does not continue
        self.orphans: dict[str, int] = {}  # session -> pushes found before the session
        self.result = Replayed()

    def run(self, records: Iterable[Record]) -> Replayed:
        for record in records:
            self.result.records += 1
            self.result.last_lsn = record.lsn
            if record.lsn <= self.snapshot_lsn.get(record.session_id, 0):
                continue
            try:
                getattr(self, f"_{record.op}")(record)
            except (ServiceError, MessageError, StateError, GradientError) as exc:
                raise RecoveryError(
                    f"journal record {record.where} ({record.op} of session "
                    f"{record.session_id!r}) cannot be replayed: {_reason(exc)}; refusing to "
                    "start. See docs/durability.md, 'Recovery by hand'."
                ) from None
            self.result.applied += 1
        for session_id, count in self.orphans.items():
            if self.store.find(session_id) is None:
                log.error(
                    "journal: %d push(es) of session %r were not replayed: no snapshot or "
                    "journal record holds that session's state",
                    count,
                    session_id,
                )
        return self.result

    def _state(self, record: Record) -> None:
        assert record.body is not None
        trainer = restore_trainer(decode_state(_buffer(record.body), TRUSTED_LIMITS))
        store = self.store
        session = store.find(record.session_id)
        if session is None:
            session = store.add(record.session_id, lambda: trainer)
            if record.op == "create" and record.time is not None:
                session.created_at = datetime.fromtimestamp(record.time, timezone.utc)
        else:
            store.replace(session, trainer)
        self.ignoring.discard(record.session_id)
        self.result.pending.setdefault(record.session_id, record.lsn)

    _create = _state

    def _push(self, record: Record) -> None:
        """A push, or a sync round (its mean gradient as a push, its pushes' keys)."""
        sid = record.session_id
        assert record.body is not None and record.iterations is not None
        gradients = None
        keys = list(record.keys)
        if record.key is not None:
            digest = record.digest
            if digest is None:  # a record of paramserver 0.1: the digest of its body
                gradients = decode_push(_buffer(record.body), TRUSTED_LIMITS)
                digest = push_digest(gradients)
            keys.append((record.key, digest))
        if record.time is not None:
            window = self.idempotency.window
            for key, digest in keys:
                self.idempotency.restore(sid, key, record.iterations, record.time + window, digest)
        session = self.store.find(sid)
        if session is None:
            # A push can reach the journal just before its session's create record; the create
            # record then holds the state after it.
            self.orphans[sid] = self.orphans.get(sid, 0) + 1
            return
        if sid in self.ignoring:
            return
        trainer = session.trainer
        if trainer.iterations != record.iterations - 1:
            message = (
                f"session {sid!r}: journal record {record.where} is {record.op} number "
                f"{record.iterations} but the session is at iteration {trainer.iterations}"
            )
            if sid in self.lossy:
                log.error(
                    "%s: its newest snapshot was refused and the journal no longer holds what "
                    "followed the older one; the session stays at iteration %d",
                    message,
                    trainer.iterations,
                )
                self.ignoring.add(sid)
                return
            raise RecoveryError(
                f"{message}; refusing to start. See docs/durability.md, 'Recovery by hand'."
            )
        pushed = decode_push_message(_buffer(record.body), TRUSTED_LIMITS)
        prepared = trainer.check_gradients(pushed.gradients)
        trainer.apply(with_sum_squares(trainer, prepared, pushed.sum_squares))
        if record.time is not None:
            session.updated_at = datetime.fromtimestamp(record.time, timezone.utc)
        self.result.pending.setdefault(sid, record.lsn)

    _round = _push

    def _delete(self, record: Record) -> None:
        sid = record.session_id
        if self.store.find(sid) is not None:
            self.store.delete(sid)
        self.idempotency.forget_session(sid)
        self.snapshots.remove(sid)
        for tracked in (self.snapshot_lsn, self.result.pending):
            tracked.pop(sid, None)
        self.lossy.discard(sid)
        self.ignoring.discard(sid)


def replay_journal(
    reader: JournalReader,
    store: SessionStore,
    idempotency: IdempotencyCache,
    snapshots: SnapshotStore,
    loaded: dict[str, Loaded],
) -> Replayed:
    """Apply the journal's records that the loaded snapshots do not hold; cut a torn tail."""
    result = _Replay(store, idempotency, snapshots, loaded).run(reader.records())
    reader.repair()
    return result
