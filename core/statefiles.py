"""Files the service keeps its state in (sessions, jobs, reviews, CDS feedback, replay cache, audit outbox) are
readable by the service's own account only: folders 0700, files 0600, whatever the process umask.

A session store holds sealed tokens and a job store names patients' studies; a file another local account can
read would hand that over (or, for the replay cache, let another account reset it). SQLite creates its ``-wal``
and ``-shm`` companions with the mode of the database file, so creating the database file 0600 before SQLite
opens it covers them too; an existing file (from a release that used the umask) is tightened when opened.

Several processes may open one file (``serve`` and its workers share ``data_dir``): WAL mode lets readers and
one writer work at once on one host. SQLite's locking is not reliable over network file systems (NFS, SMB):
keep ``data_dir`` on a local disk, or share state through Redis where the deployment says so.

A process that forks while one of its threads is inside an SQLite statement or transaction hands its child a copy
of SQLite's lock bookkeeping that says "this process holds the lock": the child's own connections to that file then
wait for a release that never comes and fail with "database is locked", for as long as the child lives. Celery's
prefork pool forks replacement children from a worker's main process while the job sweeper's thread writes the job
store there, and ``serve`` forks its web worker from a process whose audit drainer thread writes the audit outbox.
So those stores hold a :func:`fork_guarded_lock` around each use of a connection (:meth:`ThreadConnections.using`
for per-thread connections), and ``os.fork`` waits for it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import ConfigurationError

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_directory(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) if needed and make it ``0700``; return it.

    For the folder a deployment names for its state (``data_dir``). Parents that already exist are left as
    they are (``/var/lib`` is not ours to change). A shared folder (sticky bit set, as ``/tmp``) is refused:
    state needs a folder of its own.
    """
    folder = Path(path)
    try:
        _create_missing(folder)
        mode = folder.stat().st_mode
        if mode & stat.S_ISVTX:
            raise ConfigurationError(
                f"The state folder {folder} is a shared folder (sticky bit set), not one of the service's own.",
                remedy="Set data_dir to a folder of its own, for example /var/lib/imaging-cds.",
            )
        if stat.S_IMODE(mode) != PRIVATE_DIR_MODE:
            os.chmod(folder, PRIVATE_DIR_MODE)
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot create or protect the state folder {folder}: {exc.strerror}.",
            remedy="Give the service's account ownership of the folder (chown), or set another data_dir.",
        ) from exc
    return folder


def _create_missing(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each ``0700`` (``mkdir``'s mode is masked by the umask)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for created in reversed(missing):
        created.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        os.chmod(created, PRIVATE_DIR_MODE)


def private_file(path: str | Path) -> Path:
    """Create ``path`` empty if missing and make it (and SQLite's companion files) ``0600``; return it.

    Missing parent folders are created ``0700``; an existing parent is left as it is (the deployment's
    ``data_dir`` is made private by :func:`private_directory` where the service starts).
    """
    file = Path(path)
    try:
        _create_missing(file.parent)
        descriptor = os.open(file, os.O_CREAT | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE_MODE)
        try:
            os.fchmod(descriptor, PRIVATE_FILE_MODE)
        finally:
            os.close(descriptor)
        for suffix in SQLITE_COMPANIONS:
            companion = file.with_name(file.name + suffix)
            if companion.exists():
                os.chmod(companion, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot create or protect the state file {file}: {exc.strerror}.",
            remedy="Give the service's account ownership of the file (chown), or set another data_dir.",
        ) from exc
    return file


def connect_private_sqlite(path: str | Path, *, wal: bool = True, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path``, created ``0600`` in a ``0700`` folder (``:memory:`` as is).

    The connection is in autocommit mode (``isolation_level=None``: callers write ``BEGIN IMMEDIATE`` where
    they need a transaction) and may be used from several threads under the caller's own lock. ``wal``
    selects WAL journaling with ``synchronous=NORMAL``: a committed write survives the process being killed
    (what the audit outbox and the replay cache rely on); a power cut may lose the last commits.
    """
    target = str(path)
    if target != ":memory:":
        private_file(target)
    connection = sqlite3.connect(target, timeout=timeout, isolation_level=None, check_same_thread=False)
    if wal and target != ":memory:":
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    return connection


class ThreadConnections:
    """One :func:`connect_private_sqlite` connection per thread and per process, for stores used from many threads.

    A connection must not cross threads' locks, nor a fork (gunicorn ``--preload`` builds the app in the master
    process): each thread of each process opens its own on first use.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def __call__(self) -> sqlite3.Connection:
        """This thread's connection in this process."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != os.getpid():
            connection = connect_private_sqlite(self.path)  # 0600 in a 0700 folder, WAL
            self._local.connection = connection
            self._local.lock = fork_guarded_lock()
            self._local.pid = os.getpid()
        return connection

    @contextmanager
    def using(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for one statement or transaction, which a fork in another thread waits for.

        For a store written by a background thread of a process that forks (see the module docstring).
        """
        connection = self()
        with self._local.lock:
            yield connection


FORK_WAIT_S = 30.0
"""How long a fork waits for a thread to finish its statement or transaction on a guarded connection."""

_GUARDED: weakref.WeakSet[threading.Lock] = weakref.WeakSet()
_REGISTRY = threading.Lock()
_HELD_ACROSS_FORK: list[threading.Lock] = []


def fork_guarded_lock() -> threading.Lock:
    """A lock to hold around every use of one SQLite connection; ``os.fork`` in another thread waits for it.

    So that no child is forked in the middle of a statement or transaction (see the module docstring). The
    forking thread must not hold the lock itself; a fork that waited :data:`FORK_WAIT_S` goes ahead (and says so).
    """
    lock = threading.Lock()
    with _REGISTRY:
        _GUARDED.add(lock)
    return lock


def _before_fork() -> None:
    _REGISTRY.acquire()
    for lock in list(_GUARDED):
        if lock.acquire(timeout=FORK_WAIT_S):
            _HELD_ACROSS_FORK.append(lock)
        else:
            log.warning("Forking while an SQLite connection is still in use: the child may find its file locked.")


def _after_fork() -> None:
    # In the parent and in the child alike: the child's copies were taken by the thread that forked, which is the
    # child's only thread, so it releases them.
    for lock in _HELD_ACROSS_FORK:
        lock.release()
    _HELD_ACROSS_FORK.clear()
    _REGISTRY.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
