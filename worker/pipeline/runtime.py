"""What one worker process keeps between chunks: connections, pools, warm models, the lease keeper.

The runtime owns these and closes them; the stages never see it. Each stage declares what it uses
(``Claiming``, ``Preparing``, ``Computing``, ``Storing``, ``Recording``) and the runtime hands a
chunk those views, made afresh per chunk so that a field replaced between chunks (a benchmark's
explainer, ``worker.local``'s fetcher) takes effect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.db import Database, open_database
from common.db.records import QueuedJob
from common.fetch import DefaultFetcher, FetchPolicy, ImageFetcher
from common.settings import Settings
from common.storage import ObjectStore, aws_environment, open_store
from worker.attention import explain_in_batches
from worker.cores import available_cores, decode_threads, yield_cores_to_the_model
from worker.device import autocast_dtype, select_device
from worker.leases import LeaseKeeper
from worker.models import ModelCache
from worker.pipeline.artifacts import StoreTarget
from worker.pipeline.claim import Claiming
from worker.pipeline.clock import StageClock
from worker.pipeline.compute import Computing, Explainer
from worker.pipeline.cpu import CpuPool, auto_cpu_workers, compile_kernels
from worker.pipeline.prepare import Preparing
from worker.pipeline.record import Recording
from worker.pipeline.score import ScoreProgress
from worker.pipeline.shard import ShardRules
from worker.pipeline.store import Storing

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """What one worker process keeps between chunks: connections, pools, warm models.

    Threads wait on I/O (``fetch_pool`` downloads, ``store_pool`` uploads, ``record_pool`` writes the
    database, one transaction per micro-batch); ``cpu`` decodes and encodes images, in processes of
    its own when it has any, so those stages use more cores than one GIL allows.
    """

    settings: Settings
    db: Database
    store: ObjectStore
    fetcher: ImageFetcher
    models: ModelCache
    device: torch.device
    autocast: torch.dtype | None
    keeper: LeaseKeeper
    cpu: CpuPool
    fetch_pool: ThreadPoolExecutor
    store_pool: ThreadPoolExecutor
    record_pool: ThreadPoolExecutor
    explainer: Explainer = explain_in_batches
    clock: StageClock = field(default_factory=StageClock)
    on_score_progress: ScoreProgress | None = None  # set by a caller that shows progress (local runs)
    # Seconds of one-off start-up work done before any job (``warm_up``): reported on its own, since
    # charged to the first jobs it would swamp their stage seconds.
    warmup_seconds: float = 0.0
    # Decoding is CPU-bound and releases the GIL: more images at once than the cores the CPU pool
    # leaves only makes them contend (``worker.cores.decode_threads``), while downloads still run on
    # every fetch thread.
    decode_slots: threading.Semaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(available_cores())
    )
    # How a CPU-pool process opens ``store`` itself and writes an image's artifacts there; None when
    # it cannot (an in-memory store, or one the caller passed in), and this process writes them.
    store_target: StoreTarget | None = None
    # The shards layout's flush rules; None in the objects layout (one object per artifact).
    shard_rules: ShardRules | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        db: Database | None = None,
        store: ObjectStore | None = None,
        fetcher: ImageFetcher | None = None,
        node: str | None = None,
        queues: str | None = None,
        on_requeued: Callable[[list[QueuedJob]], None] | None = None,
        broker_lost: Callable[[], bool] | None = None,
    ) -> Runtime:
        db = db or open_database(settings)
        device = select_device(settings.device)
        workers = settings.cpu_workers if settings.cpu_workers is not None else auto_cpu_workers(device)
        threads, retry = settings.upload_threads, settings.storage_retry_seconds
        target = None
        if store is None:
            store = open_store(settings.resolved_storage_url(), upload_threads=threads, retry_seconds=retry)
            # By the opened store's URL, absolute: a relative folder would be another folder in a
            # process started from another working directory.
            target = StoreTarget.of(store.url, upload_threads=threads, retry_seconds=retry)
        sharded = settings.resolved_artifact_layout(store.url) == "shards"
        # On a CPU the model's threads and the pipeline's share the cores: the model's go first.
        start = yield_cores_to_the_model if device.type == "cpu" else None
        return cls(
            settings=settings,
            db=db,
            store=store,
            store_target=target,
            shard_rules=ShardRules.from_settings(settings) if sharded else None,
            fetcher=fetcher or DefaultFetcher(FetchPolicy.from_settings(settings, results_url=store.url)),
            models=ModelCache(device=device, weights_dir=settings.weights_dir, storage_retry_seconds=retry),
            device=device,
            autocast=autocast_dtype(settings.autocast, device),
            keeper=LeaseKeeper(
                db,
                settings,
                node=node,
                queues=queues,
                device=str(device),
                on_requeued=on_requeued,
                broker_lost=broker_lost,
            ),
            cpu=CpuPool(workers, aws_environment=aws_environment()),
            # A thread blocks on the pool while its image is decoded or encoded: enough threads to
            # keep every pool process busy, and at least the configured I/O concurrency.
            fetch_pool=ThreadPoolExecutor(
                max(settings.fetch_threads, workers), thread_name_prefix="vitscope-fetch", initializer=start
            ),
            store_pool=ThreadPoolExecutor(
                max(min(4, settings.upload_threads), workers),
                thread_name_prefix="vitscope-store",
                initializer=start,
            ),
            record_pool=ThreadPoolExecutor(1, thread_name_prefix="vitscope-record", initializer=start),
            decode_slots=threading.BoundedSemaphore(
                settings.decode_threads or decode_threads(workers, available_cores())
            ),
        )

    def claiming(self) -> Claiming:
        return Claiming(self.db, self.keeper, self.settings.lease_seconds, self.settings.max_attempts)

    def preparing(self) -> Preparing:
        return Preparing(self.fetcher, self.decode_slots, self.clock, self.settings.max_image_pixels)

    def computing(self) -> Computing:
        return Computing(self.device, self.autocast, self.explainer, self.clock, self.on_score_progress)

    def storing(self) -> Storing:
        return Storing(
            cpu=self.cpu,
            pool=self.store_pool,
            store=self.store,
            target=self.store_target,
            sharded=self.shard_rules is not None,
            clock=self.clock,
            device=str(self.device),
            png_level=self.settings.png_level,
        )

    def recording(self) -> Recording:
        return Recording(
            db=self.db,
            store=self.store,
            keeper=self.keeper,
            pool=self.record_pool,
            clock=self.clock,
            shard_rules=self.shard_rules,
            max_attempts=self.settings.max_attempts,
        )

    def warm_up(self) -> float:
        """Compile (or load from cache) the image kernels here and in every CPU-pool process, before
        the first job; adds the seconds to ``warmup_seconds`` and returns them."""
        seconds = compile_kernels(self.settings.png_level) + self.cpu.start()
        self.warmup_seconds += seconds
        return seconds

    @property
    def stage_seconds(self) -> dict[str, float]:
        """CPU seconds spent per stage since the runtime started (or the dict was cleared)."""
        return self.clock.seconds

    def close(self) -> None:
        self.keeper.stop()
        self.fetch_pool.shutdown(wait=True, cancel_futures=True)
        self.store_pool.shutdown(wait=True, cancel_futures=True)
        self.record_pool.shutdown(wait=True, cancel_futures=True)
        self.cpu.close()
        self.db.dispose()
