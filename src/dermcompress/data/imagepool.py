"""The thread pool the resize and degrade stages run their images on, and rereading a raw image ingest checked.

Both stages reread raw files that ingest hashed and decoded; one that no longer reads, matches or decodes means
the raw data changed under the pipeline, so every such image is collected and all are named in one error.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dermcompress.data.images import ImageError
from dermcompress.data.sources import (
    DEFAULT_MAX_FILE_BYTES,
    ImageSource,
    ImageSources,
    SourceError,
    image_paths,
    open_images,
)


class SourceChangedError(RuntimeError):
    """An image that passed ingest no longer reads, matches its sha256 or decodes: the raw data changed under
    the pipeline. `image_ids` names them (all of them, when raised by map_images)."""

    def __init__(
        self, message: str, image_ids: Sequence[str] = (), errors: Sequence[SourceChangedError] = ()
    ) -> None:
        super().__init__(message)
        self.image_ids = list(image_ids)
        self.errors = list(errors) or [self]  # one per image


RERUN_INGEST = (
    "the raw data changed since ingest: rerun the workflow from ingest (snakemake --forcerun ingest)"
)


def available_threads() -> int:
    """Cores this process may run on (what Snakemake or SLURM granted, not what the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _source(paths: tuple[str, ...], max_bytes: int, thread: int) -> ImageSource | ImageSources:
    """One open image source per thread: threads sharing a zip handle would also share its file offset."""
    return open_images(paths, max_bytes=max_bytes)


def read_member(
    images: str | Path | Sequence[str],
    image_id: str,
    member: str,
    sha256: str,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> bytes:
    """Raw bytes of one image, checked against the sha256 ingest recorded (the bytes are in memory: cheap).

    Opens the source once per thread. A missing, unreadable or changed file is a SourceChangedError.
    """
    try:
        data = _source(image_paths(images), max_bytes, threading.get_ident()).read(member)
    except (OSError, KeyError, SourceError) as err:
        raise SourceChangedError(
            f"{image_id}: cannot read {member!r} from {images} ({err}); it was read at ingest, so {RERUN_INGEST}",
            [image_id],
        ) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SourceChangedError(
            f"{image_id}: {member!r} in {images} is not the file ingest read (sha256 {sha256[:16]}...); "
            + RERUN_INGEST,
            [image_id],
        )
    return data


def source_changed(image_id: str, member: str, err: ImageError) -> SourceChangedError:
    return SourceChangedError(
        f"{image_id}: {member!r} no longer decodes ({err}); it decoded at ingest, so {RERUN_INGEST}",
        [image_id],
    )


def changed_error(errors: Sequence[SourceChangedError]) -> SourceChangedError:
    """One error that names every image of `errors` (the first 20 with their reasons)."""
    each = sorted((e for err in errors for e in err.errors), key=lambda e: e.image_ids)
    ids = [i for err in each for i in err.image_ids]
    shown = "\n  ".join(str(err) for err in each[:20])
    more = f"\n  ... and {len(each) - 20} more" if len(each) > 20 else ""
    return SourceChangedError(
        f"{len(ids)} raw image(s) changed since ingest: {', '.join(ids[:20])}\n  {shown}{more}", ids, each
    )


def map_images(
    fn: Callable[[Any], np.ndarray],
    tasks: Sequence[Any],
    *,
    shape: tuple[int, ...],
    threads: int,
    desc: str = "",
    bar: tqdm | None = None,
    sizes: list[Any] | None = None,
) -> np.ndarray:
    """Apply `fn` to every task, in order, over a thread pool; results stacked into one (N, *shape) uint8 array.
    With `sizes` (a list, filled in task order), `fn` returns (pixels, what they cost to send) instead.

    Threads, not processes: the work runs in Pillow and OpenCV with the GIL released (1.7x on 2 cores against
    1.3x for a process pool, which pays for pickling every image), and nothing is forked, so no thread pool's
    lock can be copied in a held state into a child that then hangs. The output is allocated once and filled
    as results arrive, so memory stays at one copy of the table. Images whose raw file changed since ingest
    (SourceChangedError) are all collected, then named together in one error. `bar`: a progress bar to advance
    (else one of its own, labelled `desc`).
    """
    changed: list[SourceChangedError] = []

    def guarded(task: Any) -> np.ndarray | None:
        try:
            return fn(task)
        except SourceChangedError as err:
            changed.append(err)
            return None

    out = np.empty((len(tasks), *shape), dtype=np.uint8)
    threads = max(1, min(threads, len(tasks)))
    own_bar = bar is None
    bar = tqdm(total=len(tasks), desc=desc, unit="img", mininterval=5) if own_bar else bar
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(guarded, tasks) if threads > 1 else map(guarded, tasks)
        for i, result in enumerate(results):
            if result is not None and sizes is not None:
                result, size = result
                sizes.append(size)
            if result is not None:
                out[i] = result
            bar.update()
    if own_bar:
        bar.close()
    if changed:
        raise changed_error(changed)
    return out
