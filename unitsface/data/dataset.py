"""Training datasets and the data loader.

THE input contract of every unitsface network: samples leave the dataset as uint8
CHW RGB tensors (3×112×112); after collation and the transfer to the device,
`normalize_batch` maps them to float32 (x/255 − 0.5)/0.5 ∈ [−1, 1] (formats.md §9.2,
insightface arcface_torch). Keeping uint8 until then moves 4× fewer bytes through worker
pipes and host-to-device copies, and normalising once per batch is cheaper than per image.
"""

from __future__ import annotations

import copy
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unitsface import parallel
from unitsface.data.images import FACE_SIZE, decode, list_image_folder, to_face_image
from unitsface.data.recordio import IndexedRecordIO, resolve_record_paths, scan_dataset, unpack
from unitsface.errors import UnitsfaceError


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 (x/255 − 0.5)/0.5, on the batch's device."""
    if batch.dtype != torch.uint8:
        raise UnitsfaceError(f"normalize_batch expects a uint8 batch, got {batch.dtype}")
    return batch.float().div_(127.5).sub_(1.0)


MASK_STREAM = 0x6D61736B  # first word of the mask augmentation's seed sequences ("mask")


class _FaceDataset(Dataset):
    """Decoding, flip and mask augmentation and bad-image accounting shared by both layouts.

    A corrupt image in a multi-million-image set should not end a multi-day run, but
    many of them mean a broken file: bad samples are replaced by the next good one and
    counted, with one warning, until they exceed `max_bad_fraction` of the dataset. The
    count is per process (each loader worker holds its own copy of the dataset).

    Mask augmentation (`mask_prob`, training only) draws a rendered face mask (data.masks) on the
    aligned crop. Whether image i is masked, and with which mask, comes from a generator keyed by
    (seed, epoch, i) — set per epoch by `for_epoch` — never from worker or call order, so a resumed
    run and any worker count see the same images.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, train: bool, flip: bool, max_bad_fraction: float,
                 mask_prob: float = 0.0):
        if not 0.0 <= mask_prob <= 1.0:
            raise UnitsfaceError(f"mask probability must be in [0, 1], got {mask_prob}")
        self.labels = labels
        self.num_classes = num_classes
        self.flip = train and flip
        self.mask_prob = mask_prob if train else 0.0
        self.epoch_key = (0, 0)  # (seed, epoch) of the mask draws
        self.max_bad = int(max_bad_fraction * len(labels))
        self.bad_count = 0

    def for_epoch(self, seed: int, epoch: int) -> _FaceDataset:
        """This dataset with its mask draws keyed by (seed, epoch): a shallow copy, so the images and
        index are shared and the caller's dataset is left as it was."""
        view = copy.copy(self)
        view.epoch_key = (seed % 2**63, epoch)  # seed sequences take non-negative words
        return view

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, index: int) -> tuple[bytes, str]:
        """(encoded image, its name for messages)."""
        raise NotImplementedError

    def _image(self, index: int) -> torch.Tensor:
        data, source = self._load(index)
        img = decode(data, source)
        if img.shape[:2] != (FACE_SIZE, FACE_SIZE):
            img = to_face_image(img, FACE_SIZE)
        if self.mask_prob:
            rng = np.random.default_rng([MASK_STREAM, *self.epoch_key, index])
            if rng.random() < self.mask_prob:
                from unitsface.data.masks import mask_faces

                img = mask_faces(img, rng)  # aligned crops: the template's landmarks
        chw = img.transpose(2, 0, 1)
        if self.flip and random.random() < 0.5:  # 100x cheaper than torch.rand; seeded per worker too
            chw = chw[:, :, ::-1]
        # One numpy copy does layout and flip: torch's strided uint8 copies are slower and,
        # in the main process, go through its thread pool.
        return torch.from_numpy(np.ascontiguousarray(chw))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                return self._image(current), int(self.labels[current])
            except UnitsfaceError as exc:
                self.bad_count += 1
                if self.bad_count > self.max_bad:
                    raise UnitsfaceError(
                        f"{self.bad_count} undecodable images exceed max_bad_fraction "
                        f"({self.max_bad} of {len(self)}); last: {exc}"
                    ) from None
                if self.bad_count == 1:
                    warnings.warn(f"skipping undecodable image ({exc}); further ones are only counted", stacklevel=2)
        raise UnitsfaceError("no decodable image in the dataset")


class RecordDataset(_FaceDataset):
    """A train.rec/train.idx dataset (insightface, im2rec or shuffled layouts, formats.md §4)."""

    def __init__(
        self, folder: str | os.PathLike, train: bool = True, flip: bool = True, max_bad_fraction: float = 0.001,
        mask_prob: float = 0.0,
    ):
        self.idx_path, self.rec_path = resolve_record_paths(folder)
        index = scan_dataset(folder)
        self.keys = index.keys
        super().__init__(index.labels, index.num_classes, train, flip, max_bad_fraction, mask_prob)
        self._reader: IndexedRecordIO | None = None

    def __getstate__(self) -> dict:
        # Each worker maps the file itself: an open mmap cannot be pickled for spawn.
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def _load(self, index: int) -> tuple[bytes, str]:
        if self._reader is None:
            self._reader = IndexedRecordIO(self.idx_path, self.rec_path)
        key = int(self.keys[index])
        source = f"{self.rec_path} key {key}"
        return unpack(self._reader.read(key), source)[1], source


class ImageFolderDataset(_FaceDataset):
    """`root/<identity>/<image>` with labels in sorted folder order (formats.md §10)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, flip: bool = True, max_bad_fraction: float = 0.001,
                 mask_prob: float = 0.0):
        classes, items = list_image_folder(root)
        self.classes = classes
        self.paths = [path for path, _ in items]
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        super().__init__(labels, len(classes), train, flip, max_bad_fraction, mask_prob)

    def _load(self, index: int) -> tuple[bytes, str]:
        path: Path = self.paths[index]
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise UnitsfaceError(f"cannot read {path}: {exc.strerror}") from None


def collate_faces(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 B×3×H×W, int64 B) stacked by numpy: a single-threaded memcpy, whereas torch.stack
    goes through the thread pool, which costs more than the copy on a busy host."""
    images = torch.from_numpy(np.stack([image.numpy() for image, _ in samples]))
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


class EpochSampler(Sampler[int]):
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

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())



def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int, start_batch: int = 0,
                shuffle: bool = True, pin_memory: bool = False) -> DataLoader:
    """The training DataLoader: order fixed by (seed, epoch), this rank's share, from batch `start_batch`.

    Full batches only. Worker seeding uses its own generator, never the global RNG, so that a
    resumed run draws the same random numbers as an uninterrupted one; a face dataset's mask draws
    are keyed by (seed, epoch) here.
    """
    sampler = EpochSampler(len(dataset), seed, epoch, start_batch * batch_size, shuffle, batch_size)
    if isinstance(dataset, _FaceDataset):
        dataset = dataset.for_epoch(seed, epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        collate_fn=collate_faces,
        generator=torch.Generator(),
        persistent_workers=False,
    )
