"""Sessions on disk: crash-safe snapshots, the optional write-ahead journal, recovery.

See docs/durability.md for the file formats, the recovery rules and the guarantees.
"""

from .dirlock import DirectoryLock, DirectoryLocked
from .durability import Durability, FinalSnapshotsFailed, SnapshotInfo
from .journal import CorruptJournal, Journal, JournalFailed, JournalReader
from .recovery import RecoveryError
from .snapshots import CorruptSnapshot, SnapshotStore, read_snapshot

__all__ = [
    "CorruptJournal",
    "CorruptSnapshot",
    "DirectoryLock",
    "DirectoryLocked",
    "Durability",
    "FinalSnapshotsFailed",
    "Journal",
    "JournalFailed",
    "JournalReader",
    "RecoveryError",
    "SnapshotInfo",
    "SnapshotStore",
    "read_snapshot",
]
