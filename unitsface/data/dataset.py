"""Training datasets and the data loader.

THE input contract of every unitsface network: samples leave the dataset as uint8
CHW RGB tensors (3×112×112); after collation and the transfer to the device,
`normalize_batch` maps them to float32 (x/255 − 0.5)/0.5 ∈ [−1, 1] (formats.md §9.2,
insightface arcface_torch). Keeping uint8 until then moves 4× fewer bytes through worker
pipes and host-to-device copies, and normalising once per batch is cheaper than per image.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unitsface import parallel
from unitsface.data.images import FACE_SIZE, decode, list_image_folder, to_face_image
from unitsface.data.masks import mask_faces
from unitsface.data.recordio import IndexedRecordIO, image_label, resolve_record_paths, scan_dataset, unpack
from unitsface.errors import UnitsfaceError


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 (x/255 − 0.5)/0.5, on the batch's device."""
    if batch.dtype != torch.uint8:
        raise UnitsfaceError(f"normalize_batch expects a uint8 batch, got {batch.dtype}")
    return batch.float().div_(127.5).sub_(1.0)


Sample = tuple[torch.Tensor, int, tuple[int, ...]]
"""(uint8 CHW image, class, ids of the unreadable records this sample stands in for: usually none)."""

MASK_STREAM = 0x6D61736B  # first word of the mask augmentation's seed sequences ("mask")


class _FaceDataset(Dataset):
    """Decoding, flip and mask augmentation and bad-record replacement shared by both layouts.

    A corrupt JPEG or a truncated record in a multi-million-image set must not end a multi-day
    run, but many of them mean a broken file. A sample whose record cannot be read is replaced
    by another image of its class, picked by (index, epoch) so that a resumed run reads exactly
    what an uninterrupted one would (a class left with no readable image borrows from the rest of
    the set). The ids of the unreadable records travel with the sample: loader workers are
    separate processes, so only what a sample carries reaches the training process, where
    `BadRecords` counts them and enforces `max_bad_fraction`.

    Mask augmentation (`mask_prob`, training only) draws a rendered face mask (data.masks) on the
    aligned crop. Whether image i is masked, and with which mask, comes from a generator keyed by
    (seed, epoch, i) — the seed set once by `with_seed`, the epoch carried by each sampled item — never
    from worker or call order, so a resumed run, any worker count and persistent workers see the same
    images.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, train: bool, flip: bool, max_bad_fraction: float,
                 source: str, unreadable: np.ndarray | tuple[int, ...] = (), mask_prob: float = 0.0):
        if not 0.0 <= mask_prob <= 1.0:
            raise UnitsfaceError(f"mask probability must be in [0, 1], got {mask_prob}")
        self.labels = labels
        self.num_classes = num_classes
        self.flip = train and flip
        self.mask_prob = mask_prob if train else 0.0
        self.mask_seed = 0  # the run's seed, the first word of the mask draws after MASK_STREAM
        self.source = source  # the file or folder named when the bad records are too many
        self.unreadable = tuple(int(k) for k in unreadable)  # ids the index scan could not read
        self.max_bad = int(max_bad_fraction * (len(labels) + len(self.unreadable)))
        self._known_bad: set[int] = set()  # this process: indices not worth rereading
        self._by_class: tuple[np.ndarray, np.ndarray] | None = None
        if len(self.unreadable) > self.max_bad:
            raise self.too_many_bad(self.unreadable)

    def with_seed(self, seed: int) -> _FaceDataset:
        """This dataset with its mask draws keyed by `seed`: a shallow copy, so the images and index are
        shared and the caller's dataset is left as it was."""
        view = copy.copy(self)
        view.mask_seed = seed % 2**63  # seed sequences take non-negative words
        return view

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # A worker starts without the bad records this process knows: it reports every one it meets.
        return {**self.__dict__, "_known_bad": set()}

    def record_id(self, index: int) -> int:
        """How the user finds sample `index` in the data (a `.idx` key, a file's position)."""
        raise NotImplementedError

    def _load(self, index: int) -> tuple[bytes, str]:
        """(encoded image, its name for messages)."""
        raise NotImplementedError

    def _image(self, index: int, epoch: int) -> torch.Tensor:
        data, source = self._load(index)
        img = decode(data, source)
        if img.shape[:2] != (FACE_SIZE, FACE_SIZE):
            img = to_face_image(img, FACE_SIZE)
        if self.mask_prob:
            rng = np.random.default_rng([MASK_STREAM, self.mask_seed, epoch, index])
            if rng.random() < self.mask_prob:
                img = mask_faces(img, rng)  # aligned crops: the template's landmarks
        chw = img.transpose(2, 0, 1)
        if self.flip and random.random() < 0.5:  # 100x cheaper than torch.rand; seeded per worker too
            chw = chw[:, :, ::-1]
        # One numpy copy does layout and flip: torch's strided uint8 copies are slower and,
        # in the main process, go through its thread pool.
        return torch.from_numpy(np.ascontiguousarray(chw))

    def problem(self, record_id: int) -> str:
        """Why record `record_id` cannot be read (read again: only called on the way to an error message)."""
        raise NotImplementedError

    def too_many_bad(self, ids: Iterable[int]) -> UnitsfaceError:
        """The error that stops a run: how many records are unreadable, where, and why the first one is."""
        ids = list(ids)
        return UnitsfaceError(
            f"{len(ids)} unreadable records in {self.source} exceed data.max_bad_fraction ({self.max_bad} of "
            f"{len(self) + len(self.unreadable)} records); first: {self.problem(ids[0])}"
        )

    def _candidates(self, index: int, epoch: int) -> Iterator[int]:
        """`index`, then the other images of its class in an order fixed by (index, epoch), then the rest."""
        yield index
        if self._by_class is None:  # built on the first bad record only: an argsort of millions of labels
            order = np.argsort(self.labels, kind="stable")
            self._by_class = order, np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
        order, starts = self._by_class
        label = self.labels[index]
        rng = np.random.default_rng((index, epoch))
        for other in rng.permutation(order[starts[label] : starts[label + 1]]):
            if other != index:
                yield int(other)
        first = int(rng.integers(len(self)))
        for k in range(len(self)):
            other = (first + k) % len(self)
            if self.labels[other] != label:
                yield other

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        """Sample `index` of `epoch`; `item` is (index, epoch) from EpochSampler, or an index (epoch 0)."""
        index, epoch = (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), 0)
        bad: list[int] = []
        for candidate in self._candidates(index, epoch):
            if candidate in self._known_bad:
                continue
            try:
                return self._image(candidate, epoch), int(self.labels[candidate]), tuple(bad)
            except UnitsfaceError:
                self._known_bad.add(candidate)
                bad.append(self.record_id(candidate))
            if len(self._known_bad) + len(self.unreadable) > self.max_bad:
                break  # the training process has counted at least as many and stops before using this sample
        return torch.zeros(3, FACE_SIZE, FACE_SIZE, dtype=torch.uint8), int(self.labels[index]), tuple(bad)


class RecordDataset(_FaceDataset):
    """A train.rec/train.idx dataset (insightface, im2rec or shuffled layouts, formats.md §4)."""

    def __init__(
        self, folder: str | os.PathLike, train: bool = True, flip: bool = True, max_bad_fraction: float = 0.001,
        mask_prob: float = 0.0,
    ):
        self.idx_path, self.rec_path = resolve_record_paths(folder)
        index = scan_dataset(folder)
        self.keys = index.keys
        self._reader: IndexedRecordIO | None = None
        super().__init__(index.labels, index.num_classes, train, flip, max_bad_fraction, str(self.rec_path),
                         index.unreadable, mask_prob)

    def __getstate__(self) -> dict:
        # Each worker maps the file itself: an open mmap cannot be pickled for spawn.
        return {**super().__getstate__(), "_reader": None}

    def record_id(self, index: int) -> int:
        return int(self.keys[index])

    def _read(self, key: int) -> tuple[bytes, str]:
        if self._reader is None:
            self._reader = IndexedRecordIO(self.idx_path, self.rec_path)
        source = f"{self.rec_path} key {key}"
        return unpack(self._reader.read(key), source)[1], source

    def _load(self, index: int) -> tuple[bytes, str]:
        return self._read(self.record_id(index))

    def problem(self, record_id: int) -> str:
        try:
            data, source = self._read(record_id)
            decode(data, source)
            image_label(self._reader, record_id)  # type: ignore[arg-type]
        except UnitsfaceError as exc:
            return str(exc)
        return f"{self.rec_path} key {record_id} reads now"  # a file changed under a running job


class ImageFolderDataset(_FaceDataset):
    """`root/<identity>/<image>` with labels in sorted folder order (formats.md §10)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, flip: bool = True, max_bad_fraction: float = 0.001,
                 mask_prob: float = 0.0):
        classes, items = list_image_folder(root)
        self.classes = classes
        self.paths = [path for path, _ in items]
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        super().__init__(labels, len(classes), train, flip, max_bad_fraction, str(root), mask_prob=mask_prob)

    def record_id(self, index: int) -> int:
        return index

    def _load(self, index: int) -> tuple[bytes, str]:
        path: Path = self.paths[index]
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise UnitsfaceError(f"cannot read {path}: {exc.strerror}") from None

    def problem(self, record_id: int) -> str:
        try:
            decode(*self._load(record_id))
        except UnitsfaceError as exc:
            return str(exc)
        return f"{self.paths[record_id]} reads now"


class BadRecords:
    """The distinct unreadable records this process's training has met, and the max_bad_fraction stop.

    Fed by the ids each batch carries (`collate_faces`), so the count is right whichever loader
    worker met a record; distinct ids, because every epoch meets the same bad records again.
    Starts with the records the index scan could not read. With several ranks each counts what
    it met, a lower bound of the global count, so no rank stops a run the rule would allow.
    """

    SHOWN = 5  # ids listed in the metrics

    def __init__(self, dataset: _FaceDataset) -> None:
        self.dataset = dataset
        self.ids: dict[int, None] = dict.fromkeys(dataset.unreadable)  # insertion-ordered set
        self._warned = False

    def add(self, bad: torch.Tensor) -> None:
        """Count a batch's bad ids (a CPU tensor, usually empty); raises past max_bad_fraction."""
        if not bad.numel():
            return
        ids = bad.tolist()
        self.ids.update(dict.fromkeys(ids))
        if len(self.ids) > self.dataset.max_bad:
            raise self.dataset.too_many_bad(self.ids)
        if not self._warned:
            self._warned = True
            warnings.warn(f"replacing an unreadable record ({self.dataset.problem(ids[0])}); further ones "
                          "are only counted (bad_records in metrics.jsonl)", stacklevel=2)

    def stats(self) -> dict[str, Any]:
        """`bad_records` and the first few ids (`bad_record_ids`) for the metrics; nothing while none."""
        if not self.ids:
            return {}
        return {"bad_records": len(self.ids), "bad_record_ids": list(itertools.islice(self.ids, self.SHOWN))}

    def state(self) -> list[int]:
        return list(self.ids)

    def load(self, ids: Iterable[int]) -> None:
        self.ids = dict.fromkeys([*self.dataset.unreadable, *(int(i) for i in ids)])


def collate_faces(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 B×3×H×W, int64 B labels, int64 ids of the unreadable records met). Images are stacked by
    numpy: a single-threaded memcpy, whereas torch.stack goes through the thread pool, which costs more
    than the copy on a busy host."""
    images = torch.from_numpy(np.stack([image.numpy() for image, _, _ in samples]))
    labels = torch.tensor([label for _, label, _ in samples], dtype=torch.int64)
    return images, labels, torch.tensor([i for _, _, ids in samples for i in ids], dtype=torch.int64)


class EpochSampler(Sampler[tuple[int, int]]):
    """A permutation fixed by (seed, epoch), dealt to the ranks batch by batch, starting at `start`.

    Being a pure function of its arguments is what makes resume exact without replaying
    the skipped batches through the decoder. Consecutive blocks of `batch_size` go to ranks
    0..R-1 in turn, so the global batch of step k is the same samples for any world size with
    the same batch_size × R (a 2-rank run sees the batches of a 1-process run at twice the batch).
    """

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                 batch_size: int = 1) -> None:
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle
        self.batch_size = batch_size

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        world, rank, batch = parallel.world_size(), parallel.rank(), self.batch_size
        blocks = self.size // (batch * world)
        mine = order[: blocks * world * batch].view(blocks, world, batch)[:, rank].reshape(-1)
        return mine[self.start :].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(index, epoch): the epoch reaches the dataset, which picks replacements for bad records by it."""
        return ((i, self.epoch) for i in self.indices())

    def __len__(self) -> int:
        return len(self.indices())


class EpochLoader:
    """The training loader of a whole run: `loader(epoch, start_batch)` iterates that epoch's batches
    (order fixed by (seed, epoch), this rank's share, full batches only).

    One DataLoader serves every epoch, so with workers they persist (no fork, no re-opened record
    files and no cold prefetch queue at each epoch start) and each keeps `prefetch` batches in
    flight. That is exact because nothing a worker draws depends on its history: the epoch travels
    with each sampled index and mask draws are keyed by (seed, epoch, image); the flips are drawn on
    the device by the trainer, whose dataset has `flip=False` (a dataset's own flip draws from its
    worker's RNG, whose state a persistent worker carries from epoch to epoch). Worker seeding uses its
    own generator, never the global RNG, so that a resumed run draws the same random numbers as an
    uninterrupted one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, shuffle: bool = True,
                 pin_memory: bool = False, prefetch: int = 2) -> None:
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(dataset), seed, 0, 0, shuffle, batch_size)
        if isinstance(dataset, _FaceDataset):
            dataset = dataset.with_seed(seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            drop_last=True,
            collate_fn=collate_faces,
            generator=torch.Generator(),
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
        )

    def __call__(self, epoch: int, start_batch: int = 0) -> DataLoader:
        self.sampler.epoch, self.sampler.start = epoch, start_batch * self.batch_size
        return self.loader


def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int, start_batch: int = 0,
                shuffle: bool = True, pin_memory: bool = False) -> DataLoader:
    """A loader of one epoch's batches from batch `start_batch` (`EpochLoader` for a whole run)."""
    return EpochLoader(dataset, batch_size, workers, seed, shuffle, pin_memory)(epoch, start_batch)
