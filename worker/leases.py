"""A worker process's background duties: keep its leases alive, say it is alive, recover the dead.

One daemon thread per process. Leases are short (minutes) so a worker that vanishes gives its jobs
back quickly, which means a live worker must renew them while a long chunk computes; the same tick
writes the heartbeat ``producer status`` shows and, every ``reaper_interval_seconds``, returns jobs
whose lease expired to the queue and publishes again queued jobs whose message was lost (no
publication for ``republish_after_seconds``) — both compare-and-set, so many workers reaping at
once is harmless. The same round asks the broker whether it lost its data (``broker_lost``: its
marker key is gone) and, if so, publishes again every queued job of the published distributed
batches at once rather than after ``republish_after_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from common.db import Database
from common.db.jobs import reap_expired, renew_leases, republish_queued, republish_stale
from common.db.records import QueuedJob, WorkerIdentity
from common.db.workers import record_heartbeat
from common.errors import VitscopeError
from common.settings import Settings

__all__ = ["LeaseKeeper", "current_identity", "is_dead_local_process"]

log = logging.getLogger(__name__)


def current_identity() -> WorkerIdentity:
    """This process as a job owner: ``host:pid``. Computed per call, so it is right after a fork."""
    hostname = socket.gethostname()
    return WorkerIdentity(hostname=hostname, worker_id=f"{hostname}:{os.getpid()}")


def is_dead_local_process(worker_id: str) -> bool:
    """True when ``worker_id`` names a process on this host that no longer runs (or is a zombie).

    Lets a redelivered chunk take over the jobs of a killed sibling at once instead of waiting out
    the lease. Only ever asked about owners on this host (see ``claim_jobs``).
    """
    host, _, pid_text = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


class LeaseKeeper:
    """Renews the leases of the jobs this process holds; heartbeats; optionally reaps expired leases."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        node: str | None = None,
        queues: str | None = None,
        device: str | None = None,
        on_requeued: Callable[[list[QueuedJob]], None] | None = None,
        broker_lost: Callable[[], bool] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.node = node
        self.queues = queues
        self.device = device
        self.on_requeued = on_requeued
        self.broker_lost = broker_lost
        self.current_model: str | None = None
        self.jobs_done = 0
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._next_reap = 0.0

    @property
    def identity(self) -> WorkerIdentity:
        return current_identity()

    def hold(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            self._held.update(job_ids)
        self._ensure_running()

    def release(self, job_ids: Iterable[str], *, done: bool = True) -> None:
        ids = set(job_ids)
        with self._lock:
            self._held -= ids
            if done:
                self.jobs_done += len(ids)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def _ensure_running(self) -> None:
        # A thread does not survive fork(): start (again) in whichever process holds jobs.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._stop.clear()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="vitscope-lease-keeper", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Start beating before any job arrives, so an idle worker is visible too."""
        self._ensure_running()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            self._thread.join(timeout=10)

    def tick(self) -> None:
        """One round of duties; the thread calls it every ``heartbeat_seconds``."""
        held = self.held()
        identity = self.identity
        with self.db.session() as session:
            if held:
                renew_leases(
                    session, held, worker_id=identity.worker_id, lease_seconds=self.settings.lease_seconds
                )
            record_heartbeat(
                session,
                worker=identity,
                node=self.node,
                queues=self.queues,
                device=self.device,
                running_jobs=len(held),
                current_model=self.current_model,
                jobs_done=self.jobs_done,
            )
        if self.on_requeued is not None and time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self.settings.reaper_interval_seconds
            self.reap()

    def _broker_emptied(self) -> bool:
        """Whether the broker lost its data since the last publication (False when unknown: the
        broker unreachable is asked again next round)."""
        if self.broker_lost is None:
            return False
        try:
            return self.broker_lost()
        except Exception as exc:
            log.warning("could not check the broker for lost data: %s", exc)
            return False

    def reap(self) -> Sequence[QueuedJob]:
        emptied = self._broker_emptied()
        with self.db.session() as session:
            requeued, failed = reap_expired(
                session,
                max_attempts=self.settings.max_attempts,
                host=self.identity.hostname,
                is_dead=is_dead_local_process,
            )
            lost = republish_stale(session, older_than_seconds=self.settings.republish_after_seconds)
            everything = republish_queued(session) if emptied else []
        if emptied:
            log.warning(
                "the broker lost its data (its marker key is gone: restarted without persistence, flushed "
                "or evicted): publishing again %d queued job(s) of distributed batches",
                len(everything),
            )
        if lost:
            log.warning(
                "publishing again %d queued job(s) with no message for over %.0f s (lost messages)",
                len(lost),
                self.settings.republish_after_seconds,
            )
        if failed:
            log.warning("gave up on %d job(s) whose workers stopped responding", len(failed))
        if requeued:
            log.warning("re-enqueued %d job(s) whose lease expired", len(requeued))
        seen = {job.id for job in [*requeued, *lost]}
        republish = [*requeued, *lost, *(job for job in everything if job.id not in seen)]
        if republish and self.on_requeued is not None:
            self.on_requeued(republish)
        return republish

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except VitscopeError as exc:  # a DB hiccup must not kill the thread that keeps leases alive
                log.warning("lease keeper: %s", exc)
            except Exception:
                log.exception("lease keeper tick failed")
            self._stop.wait(self.settings.heartbeat_seconds)
