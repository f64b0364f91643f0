"""The durable event log of `hnvm serve`: one SQLite table in WAL mode.

Durability choice: `PRAGMA synchronous=FULL`. In WAL mode, FULL fsyncs the WAL at every
commit, so an acknowledged event survives a process crash *and* an OS crash or power loss.
NORMAL would survive a process crash (the WAL is in the OS page cache) but could lose the last
commits on power loss; the service acknowledges an event only after its commit returns, so
FULL is what makes "acknowledged" mean "durable". The fsync costs about a millisecond per
commit, and every POST /v1/events is one transaction (several concurrent POSTs are grouped
into one commit), so throughput comes from batching, not from weaker guarantees.

Events are stored with their ORIGINAL ids (the raw log's), not model indices: the log is
independent of any model and can be replayed into a retrained one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path

from hnvm.data.store import check_writable_parent, refuse_inside_managed_dir
from hnvm.errors import HnvmError
from hnvm.online import Event

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- log order = replay order
    user     TEXT NOT NULL,
    item     TEXT NOT NULL,
    ts       REAL NOT NULL,                      -- event time (client's, or arrival time)
    session  TEXT,                               -- explicit session key, if any
    received REAL NOT NULL                       -- server time of the commit
);
"""
SYNCHRONOUS = "FULL"  # see the module docstring


SQLITE_MAGIC = b"SQLite format 3\x00"
# what makes an existing database an event log (logs of earlier versions also hold a `meta` table)
EVENT_COLUMNS = ("seq", "user", "item", "ts", "session", "received")


def check_db_path(path: str | Path, flag: str = "--db") -> None:
    """Refuse an event-log path before anything is created: a directory; any place inside a
    dataset or run directory (their files are theirs, and a new file there breaks them later);
    an existing file that is not an SQLite database. (An existing SQLite file is checked to be an
    event log when it is opened; a restart reopens its own log.)"""
    path = Path(path)
    if path.is_dir():
        raise HnvmError(f"{flag} {path}: is a directory; --db names the SQLite file")
    refuse_inside_managed_dir(path, flag)
    if path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise HnvmError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
        if head and head != SQLITE_MAGIC:
            raise HnvmError(f"{flag} {path}: exists and is not an SQLite event log; give a new file name or "
                            "the event log of an earlier `hnvm serve`")
    check_writable_parent(path, flag)


class EventLog:
    """Append-only event log. One writer: a lock file keeps a second server off the same DB
    (two processes appending would each hold a different in-memory state)."""

    def __init__(self, path: str | Path, *, synchronous: str = SYNCHRONOUS) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        check_db_path(self.path)
        # what this call creates, removed again if the log is refused: nothing is left behind
        made: list[Path] = []
        parent = self.path.parent
        while not parent.exists():
            made.append(parent)
            parent = parent.parent
        existed = self.path.exists()
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_existed = lock_path.exists()
        locked = False

        def undo() -> None:
            if not existed:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            if locked and not lock_existed:
                lock_path.unlink(missing_ok=True)
            for d in made:  # deepest first
                with suppress(OSError):
                    d.rmdir()

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(lock_path, "a+")  # noqa: SIM115
        except OSError as exc:
            undo()
            raise HnvmError(f"--db {self.path}: cannot create the event log ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()  # (the lock file is the other process's: left alone)
            raise HnvmError(f"--db {self.path}: the event log is in use by another process "
                            "(one `hnvm serve` per database)") from None
        locked = True
        conn = None
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # an existing database must be an event log: never add our tables to someone else's
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables.discard("sqlite_sequence")
            columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(events)"))
            if tables and columns != EVENT_COLUMNS:
                raise HnvmError(f"--db {self.path}: is an SQLite database of something else (tables: "
                                f"{', '.join(sorted(tables)[:5])}), not an event log of `hnvm serve`; "
                                "give a new file name")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise HnvmError(f"--db {self.path}: SQLite refused WAL mode (got {mode!r}); "
                                "use a local file system")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.executescript(SCHEMA)
        except (sqlite3.Error, HnvmError) as exc:
            if conn is not None:
                conn.close()
            undo()
            self._lock.close()
            if isinstance(exc, HnvmError):
                raise
            raise HnvmError(f"--db {self.path}: not a usable SQLite event log ({exc})") from exc
        self.conn = conn

    def append(self, events: Sequence[Event]) -> tuple[int, int]:
        """Write events in one transaction; returns (first seq, last seq). When this returns,
        the events are on disk (synchronous=FULL)."""
        now = time.time()
        rows = [(e.user, e.item, e.ts, e.session, now) for e in events]
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO events (user, item, ts, session, received) VALUES (?, ?, ?, ?, ?)", rows)
            last = cur.execute("SELECT last_insert_rowid()").fetchone()[0]
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return last - len(rows) + 1, last

    def replay(self, chunk: int = 50_000) -> Iterator[Event]:
        """Every event in log order."""
        after = 0
        while True:
            rows = self.conn.execute("SELECT seq, user, item, ts, session FROM events WHERE seq > ? "
                                     "ORDER BY seq LIMIT ?", (after, chunk)).fetchall()
            if not rows:
                return
            for _, user, item, ts, session in rows:
                yield Event(user, item, ts, session)
            after = rows[-1][0]

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self._lock.close()

    def __repr__(self) -> str:
        return f"EventLog({os.fspath(self.path)!r}, synchronous={self.synchronous})"
