"""Training datasets on real faces (AT&T, PGM) packed through `data import` + `data pack`."""

from __future__ import annotations

import io
import pickle
import random
import struct

import numpy as np
import pytest
import torch
from data_helpers import damage
from PIL import Image

from unitsface.data.dataset import BadRecords, ImageFolderDataset, RecordDataset, make_loader, normalize_batch
from unitsface.data.images import decode, encode_jpeg, encode_png, image_size, to_face_image
from unitsface.data.recordio import write_face_dataset
from unitsface.data.tools import import_images, pack
from unitsface.errors import UnitsfaceError


@pytest.fixture(scope="module")
def att(shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("att")
    import_images(shared_dir / "data" / "att_faces", root / "jpeg")
    pack(root / "jpeg", root / "rec")
    return shared_dir / "data" / "att_faces", root / "jpeg", root / "rec"


def test_record_dataset_serves_the_att_faces(att):
    source, _, rec = att
    dataset = RecordDataset(rec, train=False)
    assert len(dataset) == 400 and dataset.num_classes == 40
    image, label, bad = dataset[10]  # sorted folders: s1, s10, s11, ... -> index 10 is s10/1.pgm
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112) and label == 1 and bad == ()
    pgm = np.asarray(Image.open(source / "s10" / "1.pgm"))
    assert pgm.shape == (112, 92)
    expected = to_face_image(pgm)  # 92 wide: padded with 10 black columns each side
    hwc = image.permute(1, 2, 0).numpy().astype(int)
    assert np.abs(hwc - expected).mean() < 2.5  # JPEG loss only
    assert hwc[:, :8].max() < 20 and hwc[:, 104:].max() < 20
    assert np.abs(hwc[..., 0] - hwc[..., 2]).max() < 12  # a grey face stays grey in RGB
    assert sorted({dataset[i][1] for i in range(0, 400, 10)}) == list(range(40))


def test_flip_is_random_in_training_only(att):
    _, _, rec = att
    train = RecordDataset(rec, train=True, flip=True)
    reference = RecordDataset(rec, train=False)[5][0]
    random.seed(0)
    draws = [train[5][0] for _ in range(40)]
    flipped = sum(torch.equal(d, reference.flip(-1)) for d in draws)
    unflipped = sum(torch.equal(d, reference) for d in draws)
    assert flipped + unflipped == 40 and 8 < flipped < 32
    assert not torch.equal(reference, reference.flip(-1))


def test_image_folder_dataset_matches_the_record_dataset(att):
    _, jpeg_root, rec = att
    folder, records = ImageFolderDataset(jpeg_root, train=False), RecordDataset(rec, train=False)
    assert folder.classes[:3] == ["s1", "s10", "s11"] and folder.num_classes == 40
    for i in (0, 123, 399):  # pack copies conforming JPEGs byte for byte
        assert torch.equal(folder[i][0], records[i][0]) and folder[i][1] == records[i][1]


def test_normalize_batch_is_the_input_contract():
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize_batch(batch)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.flatten().numpy(), [-1.0, (51 / 255 - 0.5) / 0.5, 1.0], atol=1e-6)
    with pytest.raises(UnitsfaceError, match="uint8"):
        normalize_batch(out)


def test_loader_batches_and_seeded_epoch_shuffling(att):
    _, _, rec = att
    dataset = RecordDataset(rec, train=False)

    def epoch_labels(seed: int, epoch: int, workers: int = 0, start_batch: int = 0) -> list[int]:
        loader = make_loader(dataset, 64, workers, seed, epoch, start_batch=start_batch)
        labels = []
        for images, target, bad in loader:
            assert bad.dtype == torch.int64 and bad.numel() == 0
            assert images.shape == (64, 3, 112, 112) and images.dtype == torch.uint8
            labels += target.tolist()
        return labels

    first = epoch_labels(7, 0)
    assert len(first) == 384  # 400 // 64 full batches
    assert first == epoch_labels(7, 0)
    assert first == epoch_labels(7, 0, workers=2)  # worker processes open the rec themselves
    assert first != epoch_labels(7, 1) and first != epoch_labels(8, 0)
    assert epoch_labels(7, 0, start_batch=2) == first[128:]  # a resumed epoch skips what was consumed
    ordered = make_loader(dataset, 100, 0, seed=0, epoch=0, shuffle=False)
    assert torch.cat([t for _, t, _ in ordered]).tolist() == dataset.labels.tolist()


def test_dataset_survives_pickling_for_spawned_workers(att):
    _, _, rec = att
    dataset = RecordDataset(rec, train=False)
    first = dataset[3]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[3][0], first[0]) and clone[3][1] == first[1]


def grey(value: int) -> bytes:
    return encode_jpeg(np.full((112, 112, 3), value, np.uint8))


@pytest.fixture
def damaged(tmp_path):
    """Class 0: keys 1-4 (key 2 an unreadable JPEG); class 1: keys 5-8; class 2: key 9 alone, unreadable."""
    items = [(0, grey(10 * i)) for i in range(1, 5)] + [(1, grey(100 + 10 * i)) for i in range(4)] + [(2, grey(250))]
    write_face_dataset(tmp_path, items)
    damage(tmp_path, [2, 9], "image")
    return tmp_path


def test_unreadable_image_is_replaced_by_its_class_keyed_by_index_and_epoch(damaged):
    dataset = RecordDataset(damaged, train=False, max_bad_fraction=0.5)
    readable = {int(dataset[i][0][0, 0, 0]): i for i in (0, 2, 3)}  # the other images of class 0
    picks = []
    for epoch in range(12):
        image, label, bad = dataset[(1, epoch)]
        assert label == 0 and bad == ((2,) if epoch == 0 else ())  # a process reads a bad record once
        assert int(image[0, 0, 0]) in readable
        again = RecordDataset(damaged, train=False, max_bad_fraction=0.5)[(1, epoch)]  # another process
        assert torch.equal(again[0], image) and again[2] == (2,)
        picks.append(readable[int(image[0, 0, 0])])
    assert len(set(picks)) > 1  # epochs draw different stand-ins
    image, label, bad = dataset[8]  # class 2 has no readable image left: another class stands in
    assert bad == (9,) and label != 2 and int(image[0, 0, 0]) < 240


def test_bad_records_are_counted_across_loader_workers(damaged):
    def epoch(workers: int) -> tuple[list[torch.Tensor], list[int]]:
        dataset = RecordDataset(damaged, train=False, max_bad_fraction=0.5)
        counter = BadRecords(dataset)
        batches = []
        with pytest.warns(UserWarning, match=r"unreadable record \(cannot decode .*train.rec key [29]"):
            for images, labels, bad in make_loader(dataset, 3, workers, seed=3, epoch=1):
                counter.add(bad)
                batches += [images, labels]
        return batches, counter.state()

    in_process, ids = epoch(0)
    in_workers, ids_workers = epoch(2)  # each worker meets its own records; the batches carry the ids
    assert sorted(ids) == sorted(ids_workers) == [2, 9]
    assert len(in_process) == 6 and all(torch.equal(a, b) for a, b in zip(in_process, in_workers))


def test_too_many_bad_records_stop_with_the_file_named(damaged):
    dataset = RecordDataset(damaged, train=False, max_bad_fraction=0.15)  # 1 of 9 tolerated
    counter = BadRecords(dataset)
    with pytest.warns(UserWarning, match="further ones are only counted"):
        counter.add(torch.tensor([2]))
    assert counter.stats() == {"bad_records": 1, "bad_record_ids": [2]}
    with pytest.raises(UnitsfaceError, match=r"^2 unreadable records in .*train\.rec exceed data.max_bad_fraction "
                                             r"\(1 of 9 records\); first: cannot decode .*train.rec key 2"):
        counter.add(torch.tensor([2, 9]))
    strict = RecordDataset(damaged, train=False)  # default 0.001 of 9 images: none tolerated
    image, label, bad = strict[1]  # gives up at once: the training process stops before using it
    assert bad == (2,) and not image.any()


def test_records_the_scan_cannot_read_count_from_the_start(damaged):
    damage(damaged, [5], "frame")  # bad magic: not even the label can be read
    dataset = RecordDataset(damaged, train=False, max_bad_fraction=0.3)
    assert len(dataset) == 8 and dataset.unreadable == (5,) and 5 not in dataset.keys.tolist()
    counter = BadRecords(dataset)
    assert counter.stats() == {"bad_records": 1, "bad_record_ids": [5]}
    counter.load([2])  # a resumed run: checkpointed ids plus the scan's
    assert counter.state() == [5, 2]
    with pytest.raises(UnitsfaceError, match="1 unreadable records in .* first: .*key 5: bad magic"):
        RecordDataset(damaged, train=False)


def test_decode_formats_and_face_resizing():
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))  # 20 x 30 ramp
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=95)
    rgb = decode(buffer.getvalue())
    assert rgb.shape == (20, 30, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.abs(rgb[..., 1].astype(int) - grey).mean() < 3
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PPM")  # a binary PNM (as PGM/PPM files are) goes through Pillow
    assert np.array_equal(decode(buffer.getvalue())[..., 1], grey)
    rgba = np.dstack([grey, grey // 2, 255 - grey, np.full_like(grey, 7)])
    assert np.array_equal(decode(encode_png(rgba)), rgba[..., :3])  # PNG: lossless, alpha dropped
    with pytest.raises(UnitsfaceError, match="cannot decode key 9"):
        decode(b"\xff\xd8\xff garbage", "key 9")
    wide = to_face_image(np.full((50, 200, 3), 255, np.uint8))  # scaled to 112 x 28, centred
    assert wide.shape == (112, 112, 3)
    assert wide[:41].max() == 0 and wide[43:69].min() == 255 and wide[71:].max() == 0


def tiff_claiming(width: int) -> bytes:
    """A 12x16 TIFF whose ImageWidth tag says `width`."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:
            struct.pack_into("<HHII", data, entry, 256, 4, 1, width)  # one LONG
    return bytes(data)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"P6\n100000 100000\n255\n" + bytes(30), r"cannot decode img \(51 bytes\): Image size .* exceeds limit"),
        (tiff_claiming(8454148), r"cannot decode img .*: Image size \(135266368 pixels\) exceeds limit"),
        (b"P5\n9000 9000\n255\n" + bytes(30), "img: a 9000x9000 image exceeds the 67108864-pixel limit"),
    ],
    ids=["ppm-bomb", "tiff-135M", "pgm-81M"],
)
def test_images_that_raised_other_errors_or_ran_out_of_memory(data, match):
    """Found by bench/fuzz_readers.py: Pillow's DecompressionBombError escaped, and a TIFF whose header claimed
    135 Mpixel (under Pillow's error limit) made Pillow allocate 400 MB (MemoryError under the fuzzer's RLIMIT_AS)."""
    with pytest.raises(UnitsfaceError, match=match) as info:
        decode(data, "img")
    assert "\n" not in str(info.value)


def test_a_jpeg_claiming_a_huge_size_is_refused_from_its_header():
    """8193² pixels: under Pillow's bomb limit, so only our limit keeps the decoder from allocating 200 MB."""
    jpeg = bytearray(encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = b"\x20\x01\x20\x01"  # height, width
    for read in (decode, image_size):
        with pytest.raises(UnitsfaceError, match="img: a 8193x8193 image exceeds the 67108864-pixel limit"):
            read(bytes(jpeg), "img")
