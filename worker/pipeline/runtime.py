"""What one worker process keeps between chunks: connections, pools, warm models, the lease keeper."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.db import Database, open_database
from common.db.records import QueuedJob
from common.fetch import DefaultFetcher, FetchPolicy, ImageFetcher
from common.settings import Settings
from common.storage import ObjectStore, open_store
from worker.device import autocast_dtype, select_device
from worker.keeper import LeaseKeeper
from worker.models import ModelCache

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """What one worker process keeps between chunks: connections, thread pools, warm models."""

    settings: Settings
    db: Database
    store: ObjectStore
    fetcher: ImageFetcher
    models: ModelCache
    device: torch.device
    autocast: torch.dtype | None
    keeper: LeaseKeeper
    fetch_pool: ThreadPoolExecutor
    render_pool: ThreadPoolExecutor

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
    ) -> Runtime:
        db = db or open_database(settings)
        device = select_device(settings.device)
        return cls(
            settings=settings,
            db=db,
            store=store
            or open_store(
                settings.resolved_storage_url(),
                upload_threads=settings.upload_threads,
                retry_seconds=settings.storage_retry_seconds,
            ),
            fetcher=fetcher or DefaultFetcher(FetchPolicy.from_settings(settings)),
            models=ModelCache(device=device, weights_dir=settings.weights_dir),
            device=device,
            autocast=autocast_dtype(settings.autocast, device),
            keeper=LeaseKeeper(
                db, settings, node=node, queues=queues, device=str(device), on_requeued=on_requeued
            ),
            fetch_pool=ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="vitscope-fetch"),
            render_pool=ThreadPoolExecutor(
                min(4, settings.upload_threads), thread_name_prefix="vitscope-store"
            ),
        )

    def close(self) -> None:
        self.keeper.stop()
        self.fetch_pool.shutdown(wait=True, cancel_futures=True)
        self.render_pool.shutdown(wait=True, cancel_futures=True)
        self.db.dispose()
