"""Durable state of the Files and Batches API: SQLite for records, one plain file per uploaded file.

Layout under the data dir:
    conserve.db        files, batches and per-line batch results (SQLite, WAL)
    files/<file_id>    file contents, immutable once visible
    files/.tmp-<id>    a file being written; never visible, removed at start
    lock               flock held while a Store is open: one server per data dir

Durability rule: anything a client was told about survives SIGKILL and power loss.
- A file's bytes are fsynced and atomically renamed into place (then the directory is fsynced)
  *before* its row is committed, and the row is committed before the upload's 200.
- A finished batch line is a committed row; `request_counts` are updated in the same transaction, so a
  count a client has seen never exceeds what is on disk.
- synchronous=FULL: with WAL, NORMAL would already survive SIGKILL (the WAL is in the OS page cache),
  but a power cut could lose the last commits after we acknowledged them. FULL fsyncs the WAL on every
  commit; the batch runner group-commits lines that finish together, so this costs one fsync per group.

Crash leftovers are harmless: a content file without a row (crash between rename and commit, or between
deleting a row and unlinking) and `.tmp-*` files are removed when the store opens.

Threading: one SQLite connection per thread (WAL readers never wait for a writer's fsync, so the event
loop can read while a worker thread commits); writes are serialized by a lock.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_api(self) -> dict:
        # OpenAI's schema has no null for expires_at or status_details: files never expire here, so both are left out.
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class Batch:
    """A batch job; field names are OpenAI's, counts are flattened."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] | None = None
    errors: list[dict] = field(default_factory=list)  # whole-batch errors: [{code, message, param, line}]

    def to_api(self) -> dict:
        """OpenAI's batch object. Its schema types the optional fields (file ids, timestamps, errors) without
        null, so the ones not set yet are left out; metadata alone is nullable."""
        batch = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at, "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at, "failed_at": self.failed_at, "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
        }
        return {**{k: v for k, v in batch.items() if v is not None}, "metadata": self.metadata}


@dataclass
class LineResult:
    """One finished input line: `doc` is its output- or error-file JSON line (without newline)."""

    batch_id: str
    line: int  # 1-based physical line number in the input file
    ok: bool
    doc: str


class PendingFile:
    """A file being written. Invisible to the API until `Store.commit_file` (or `finish_batch`)."""

    def __init__(self, directory: Path, file_id: str) -> None:
        self.id = file_id
        self.size = 0
        self._dir = directory
        self._tmp = directory / f".tmp-{file_id}"
        self._f = open(self._tmp, "xb")
        self._sealed = False

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.size += len(data)

    def seal(self) -> None:
        """Make the bytes durable under their final name (blocking: call from a worker thread)."""
        if self._sealed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._dir / self.id)
        _fsync_dir(self._dir)
        self._sealed = True

    def discard(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
        if self._sealed:
            (self._dir / self.id).unlink(missing_ok=True)


class Store:
    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._db_path = self.data_dir / "conserve.db"
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lock_file = _lock_dir(self.data_dir)
        self._conn().executescript(_SCHEMA)
        self._remove_leftovers()

    # -- connections and transactions --------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _write(self):
        return _Transaction(self._conn(), self._write_lock)

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _remove_leftovers(self) -> None:
        known = {row[0] for row in self._conn().execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith(".tmp-") or path.name not in known:
                path.unlink(missing_ok=True)

    # -- files -------------------------------------------------------------------------------------
    def new_file(self) -> PendingFile:
        return PendingFile(self.files_dir, new_id("file-"))

    def commit_file(self, pending: PendingFile, filename: str, purpose: str) -> FileRecord:
        """Seal the bytes, then commit the row (blocking: call from a worker thread)."""
        pending.seal()
        rec = FileRecord(pending.id, pending.size, int(time.time()), filename, purpose)
        with self._write() as conn:
            _insert_file(conn, rec)
        return rec

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._conn().execute("SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ?",
                                   (file_id,)).fetchone()
        return FileRecord(*row) if row else None

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def list_files(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                   ascending: bool = False) -> tuple[list[FileRecord], bool]:
        """Returns (page, has_more). Raises LookupError when `after` is not a known file id."""
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            where.append(f"seq {'>' if ascending else '<'} ?")
            args.append(self._seq("files", after))
        sql = ("SELECT id, bytes, created_at, filename, purpose FROM files"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?")
        rows = self._conn().execute(sql, (*args, limit + 1)).fetchall()
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        # Unlink after the commit: a crash in between leaves an orphan that the next start removes.
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return deleted

    def _seq(self, table: str, obj_id: str) -> int:
        row = self._conn().execute(f"SELECT seq FROM {table} WHERE id = ?", (obj_id,)).fetchone()
        if row is None:
            raise LookupError(obj_id)
        return row[0]

    # -- batches -----------------------------------------------------------------------------------
    def create_batch(self, batch: Batch) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO batches (id, status, doc) VALUES (?, ?, ?)",
                         (batch.id, batch.status, json.dumps(asdict(batch))))

    def get_batch(self, batch_id: str) -> Batch | None:
        row = self._conn().execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return Batch(**json.loads(row[0])) if row else None

    def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
        """Newest first; returns (page, has_more). Raises LookupError for an unknown `after`."""
        if after is None:
            rows = self._conn().execute("SELECT doc FROM batches ORDER BY seq DESC LIMIT ?",
                                        (limit + 1,)).fetchall()
        else:
            rows = self._conn().execute("SELECT doc FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                                        (self._seq("batches", after), limit + 1)).fetchall()
        return [Batch(**json.loads(r[0])) for r in rows[:limit]], len(rows) > limit

    def unfinished_batches(self) -> list[Batch]:
        marks = ",".join("?" * len(UNFINISHED))
        rows = self._conn().execute(f"SELECT doc FROM batches WHERE status IN ({marks}) ORDER BY seq",
                                    UNFINISHED).fetchall()
        return [Batch(**json.loads(r[0])) for r in rows]

    def update_batch(self, batch_id: str, results: Sequence[LineResult] = (),
                     if_status: Collection[str] | None = None, **changes) -> Batch:
        """In one transaction: record `results` (bumping the counts) and apply `changes`, the latter only
        if the batch's status is in `if_status` (when given) so racing status moves cannot undo each
        other. Returns the batch as committed."""
        with self._write() as conn:
            _insert_results(conn, results)
            batch = _load_batch(conn, batch_id)
            if changes and (if_status is None or batch.status in if_status):
                for key, value in changes.items():
                    setattr(batch, key, value)
                _save_batch(conn, batch)
        return batch

    # -- per-line results --------------------------------------------------------------------------
    def add_results(self, rows: Sequence[LineResult]) -> None:
        """Commit finished lines (of any batches) and their counts; re-adding a line is a no-op."""
        with self._write() as conn:
            _insert_results(conn, rows)

    def finished_lines(self, batch_id: str) -> set[int]:
        return {r[0] for r in self._conn().execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def result_docs(self, batch_id: str, ok: bool) -> Iterator[str]:
        """Output (ok) or error lines of a batch, in input order."""
        cur = self._conn().execute("SELECT doc FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
                                   (batch_id, int(ok)))
        for (doc,) in cur:
            yield doc

    def finish_batch(self, batch_id: str, files: Sequence[tuple[PendingFile, str]], **changes) -> Batch:
        """The last step of a batch, atomically: register its sealed output/error files (purpose
        batch_output), apply `changes` (status, ids, timestamps) and drop its per-line rows."""
        with self._write() as conn:
            now = int(time.time())
            for pending, filename in files:
                _insert_file(conn, FileRecord(pending.id, pending.size, now, filename, "batch_output"))
            batch = _load_batch(conn, batch_id)
            for key, value in changes.items():
                setattr(batch, key, value)
            _save_batch(conn, batch)
            conn.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
        return batch


class _Transaction:
    """`with`: BEGIN IMMEDIATE under the write lock; COMMIT on success, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn, self.lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


def _insert_file(conn: sqlite3.Connection, rec: FileRecord) -> None:
    conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                 (rec.id, rec.bytes, rec.created_at, rec.filename, rec.purpose))


def _load_batch(conn: sqlite3.Connection, batch_id: str) -> Batch:
    row = conn.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        raise KeyError(batch_id)
    return Batch(**json.loads(row[0]))


def _save_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.execute("UPDATE batches SET status = ?, doc = ? WHERE id = ?",
                 (batch.status, json.dumps(asdict(batch)), batch.id))


def _insert_results(conn: sqlite3.Connection, rows: Sequence[LineResult]) -> None:
    bumps: dict[str, list[int]] = {}
    for r in rows:
        cur = conn.execute("INSERT OR IGNORE INTO results (batch_id, line, ok, doc) VALUES (?, ?, ?, ?)",
                           (r.batch_id, r.line, int(r.ok), r.doc))
        if cur.rowcount:
            bump = bumps.setdefault(r.batch_id, [0, 0])
            bump[0 if r.ok else 1] += 1
    for batch_id, (ok, bad) in bumps.items():
        batch = _load_batch(conn, batch_id)
        batch.completed += ok
        batch.failed += bad
        _save_batch(conn, batch)


def _lock_dir(data_dir: Path):
    """Hold an exclusive lock on the data dir: a second server on it would delete the first one's
    in-flight uploads as crash leftovers."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, run one server per data dir
        return None
    f = open(data_dir / "lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"data dir {data_dir} is in use by another conserve process") from None
    return f


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is; Windows cannot open directories.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
