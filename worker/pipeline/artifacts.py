"""An image's artifacts drawn, encoded, hashed and written by the process that draws them.

On a GPU host the driving process — one GIL — must do nothing per image but feed the device and
record. Sending PNG bytes back from the CPU pool only for the driving process to write, hash and
describe them cost it about 3 ms per image (as much as the rest of its work), and the pool half of
that went unused. So when the store can be opened again by URL in another process (a local folder
or S3; ``StoreTarget``), a pool process opens it once and writes the whole image's artifacts
itself; only their descriptions (``ArtifactRecord``) travel back. A store that cannot be shared (an
in-memory store, or one a caller built and passed in) is written by the driving process as before.

In the shards layout (``common.storage.shards``) nothing is written per image: the pool (or a store
thread) draws and encodes, and ``encode_artifacts`` returns the files with their descriptions; the
record stage writes a whole shard of jobs at once and only then fills in each artifact's URI.

Durability stays with the driving process: a pool process hands the keys it wrote over
(``ObjectStore.hand_over``) and the driving process takes them over (``take_over``), so its one
``sync`` per micro-batch, before the jobs are recorded, covers files written by any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.db.records import ArtifactRecord
from common.keys import artifact_key, sample_key
from common.storage import ObjectStore, open_store
from common.storage.uri import uri_scheme
from worker.pipeline.cpu import Pictures, draw_pictures
from worker.render import npy_bytes

__all__ = [
    "Encoded",
    "ImageArtifacts",
    "StoreTarget",
    "Written",
    "draw",
    "encode_artifacts",
    "encode_artifacts_many",
    "put_artifacts",
    "write_artifacts",
    "write_artifacts_many",
]

# Schemes whose store another process reaches by opening the same URL: the same folder, the same bucket.
_SHAREABLE_SCHEMES = ("", "file", "s3")


@dataclass(frozen=True)
class StoreTarget:
    """How a pool process opens the driving process's store: its URL and its options. The ``AWS_*``
    variables boto3 builds its client from are the pool's (``CpuPool(aws_environment=…)``)."""

    url: str
    upload_threads: int
    retry_seconds: float

    @classmethod
    def of(cls, url: str, *, upload_threads: int, retry_seconds: float) -> StoreTarget | None:
        """The target for a store opened from ``url``; None for one another process cannot share."""
        if uri_scheme(url) not in _SHAREABLE_SCHEMES:
            return None
        return cls(url, upload_threads, retry_seconds)


_opened: dict[StoreTarget, ObjectStore] = {}
_opened_lock = threading.Lock()


def _open(target: StoreTarget) -> ObjectStore:
    """This process's store for ``target``, opened on first use."""
    with _opened_lock:
        store = _opened.get(target)
        if store is None:
            store = _opened[target] = open_store(
                target.url, upload_threads=target.upload_threads, retry_seconds=target.retry_seconds
            )
        return store


@dataclass(frozen=True)
class ImageArtifacts:
    """What one image's artifacts are made of: its identity (the key parts), the crop, the arrays
    by artifact name, the overlays the device already drew, the layer grid's title and the PNG level."""

    image_sha256: str
    model: str
    config: str
    crop: np.ndarray
    arrays: Mapping[str, np.ndarray]
    overlays: Mapping[str, np.ndarray] | None
    title: str
    png_level: int

    def key(self, name: str) -> str:
        """The deterministic object key of the artifact ``name`` of this image."""
        return artifact_key(self.image_sha256, self.model, self.config, name)

    @property
    def sample_key(self) -> str:
        """This image's sample key in a shard: its members are ``<sample key>.<artifact name>``."""
        return sample_key(self.image_sha256, self.config)


@dataclass(frozen=True)
class Written:
    """The artifacts as the database describes them, the keys written (for ``take_over``), and the
    CPU seconds of drawing, encoding and storing them."""

    artifacts: list[ArtifactRecord]
    keys: list[str]
    seconds: dict[str, float]


def _content_type(name: str) -> str:
    return "image/png" if name.endswith(".png") else "application/x-npy"


def draw(image: ImageArtifacts) -> Pictures:
    """``draw_pictures`` for one image: its pictures encoded, in whichever process runs it."""
    return draw_pictures(
        image.crop, image.arrays, overlays=image.overlays, title=image.title, png_level=image.png_level
    )


@dataclass(frozen=True)
class Encoded:
    """An image's artifact files, encoded and described but not written: the files in member order,
    their rows with ``uri`` still empty, and the CPU seconds they cost."""

    sample_key: str
    files: list[tuple[str, bytes]]
    artifacts: list[ArtifactRecord]
    seconds: dict[str, float]


def encode_artifacts(image: ImageArtifacts, pictures: Pictures) -> Encoded:
    """The arrays as ``.npy`` bytes beside the encoded ``pictures``, sorted by name, each described
    (size, SHA-256, shape, dtype): what either layout stores for one image, a shard as it is
    (``common.storage.shards``) and the objects layout one object per file (``put_artifacts``)."""
    start = time.thread_time()
    arrays = image.arrays
    files = sorted({**{name: npy_bytes(array) for name, array in arrays.items()}, **pictures.files}.items())
    artifacts = [
        ArtifactRecord(
            name=name,
            uri="",
            content_type=_content_type(name),
            bytes=len(data),
            checksum=hashlib.sha256(data).hexdigest(),
            shape="x".join(str(d) for d in (arrays[name].shape if name in arrays else pictures.shapes[name])),
            dtype=str(arrays[name].dtype) if name in arrays else "uint8",
        )
        for name, data in files
    ]
    return Encoded(
        image.sample_key, files, artifacts, {**pictures.seconds, "store": time.thread_time() - start}
    )


def put_artifacts(store: ObjectStore, image: ImageArtifacts, pictures: Pictures) -> Written:
    """``encode_artifacts``, each file written under its deterministic key (the objects layout).
    The seconds are the pictures' and the encoding's and writing's."""
    start = time.thread_time()
    encoded = encode_artifacts(image, pictures)
    keys = {name: image.key(name) for name, _ in encoded.files}
    uris = store.put_many((keys[name], data, _content_type(name)) for name, data in encoded.files)
    artifacts = [dataclasses.replace(row, uri=uris[keys[row.name]]) for row in encoded.artifacts]
    seconds = {**pictures.seconds, "store": time.thread_time() - start}
    return Written(artifacts, list(keys.values()), seconds)


def encode_artifacts_many(images: list[ImageArtifacts]) -> list[Encoded | Exception]:
    """Draw and encode several images' artifacts in one pool call, writing nothing; an image that
    fails returns its error in its place. Runs in the CPU pool."""
    results: list[Encoded | Exception] = []
    for image in images:
        try:
            results.append(encode_artifacts(image, draw(image)))
        except Exception as exc:
            results.append(exc)
    return results


def write_artifacts(target: StoreTarget, image: ImageArtifacts) -> Written:
    """Draw, encode and write one image's artifacts in this (pool) process; hand their durability
    back to the caller. Runs in the CPU pool."""
    store = _open(target)
    pictures = draw(image)
    try:
        return put_artifacts(store, image, pictures)
    finally:  # never tracked here, even after a failed write: the driving process syncs what it records
        store.hand_over(image.key(name) for name in [*image.arrays, *pictures.files])


def write_artifacts_many(target: StoreTarget, images: list[ImageArtifacts]) -> list[Written | Exception]:
    """``write_artifacts`` for several images in one pool call; an image that fails returns its
    error in its place, so one bad image fails only its own job. Runs in the CPU pool."""
    results: list[Written | Exception] = []
    for image in images:
        try:
            results.append(write_artifacts(target, image))
        except Exception as exc:
            results.append(exc)
    return results
