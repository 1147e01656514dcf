"""The mask renderer: geometry on real and synthetic faces, determinism, colours, bounds, the training
augmentation in the loader, YuNet landmarks, and `unitsface data mask`."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from unitsface.align import ARCFACE_TEMPLATE
from unitsface.cli import main
from unitsface.data import synthetic as syn
from unitsface.data.bins import load_bin, save_bin
from unitsface.data.dataset import EpochLoader, RecordDataset, make_loader
from unitsface.data.images import decode, encode_jpeg, encode_png
from unitsface.data.masks import COLOUR_P, COLOURS, KINDS, MaskParams, mask_faces, render_masks, sample_masks
from unitsface.data.recordio import write_face_dataset
from unitsface.detect import FaceDetector, face_crop
from unitsface.errors import UnitsfaceError

ROOT = Path(__file__).resolve().parents[1]


def yunet(shared_dir: Path) -> Path:
    return shared_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx"


@pytest.fixture(scope="module")
def detector(shared_dir):
    return FaceDetector(yunet(shared_dir))


@pytest.fixture(scope="module")
def att_aligned(shared_dir, detector):
    """One aligned face per AT&T identity and where its five detected landmarks land in the crop."""
    crops, marks = [], []
    for person in range(1, 41):
        path = shared_dir / "data" / "att_faces" / f"s{person}" / f"{person % 10 + 1}.pgm"
        crop, landmarks = face_crop(np.asarray(Image.open(path)), str(path), detector)
        assert landmarks is not None, path
        crops.append(crop)
        marks.append(landmarks)
    return np.stack(crops), np.stack(marks)


def synthetic_neutral(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic faces without nuisance (no pose, no expression) and their true landmarks: the drawn
    identity's eye centres, nose (nostril line) and mouth corners, in pixel-centre coordinates."""
    faces, marks = [], []
    for i in range(count):
        idp = syn.identity_params(3, syn.TRAIN_SPLIT, i)
        nu = syn.nuisance_params(3, syn.TRAIN_SPLIT, i, 0, difficulty=0.0)
        faces.append(syn.render_face(idp, nu.__class__(**{**nu.__dict__, "occluder": "none"})))
        points = [(syn._MID - idp.eye_dx, idp.eye_y), (syn._MID + idp.eye_dx, idp.eye_y), (syn._MID, idp.nose_y),
                  (syn._MID - idp.mouth_w, idp.mouth_y), (syn._MID + idp.mouth_w, idp.mouth_y)]
        marks.append(np.asarray(points) - 0.5)  # template units -> pixel centres
    return np.stack(faces), np.stack(marks)


def coverage_at(alpha: np.ndarray, points: np.ndarray, radius: int = 0) -> np.ndarray:
    """(faces, 5) minimum coverage over a (2r+1)² pixel square at each landmark."""
    out = np.ones(points.shape[:2])
    xy = np.rint(points).astype(int)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys, xs = np.clip(xy[..., 1] + dy, 0, 111), np.clip(xy[..., 0] + dx, 0, 111)
            out = np.minimum(out, alpha[np.arange(len(alpha))[:, None], ys, xs])
    return out


def max_coverage_near(alpha: np.ndarray, points: np.ndarray, radius: int) -> np.ndarray:
    return 1 - coverage_at(1 - alpha, points, radius)


def check_geometry(faces: np.ndarray, landmarks: np.ndarray | None, truth: np.ndarray, seed: int) -> None:
    """Every kind covers the nose tip and both mouth corners (with a 2-pixel margin) and leaves a 7×7
    square around each eye untouched; pixels the mask does not cover come back unchanged."""
    for k, kind in enumerate(KINDS):
        params = sample_masks(np.random.default_rng([seed, k]), len(faces), (kind,))
        out, alpha = render_masks(faces, params, landmarks, return_alpha=True)
        lower = coverage_at(alpha, truth[:, 2:], radius=2)
        assert lower.min() > 0.99, (kind, np.argwhere(lower <= 0.99))
        eyes = max_coverage_near(alpha, truth[:, :2], radius=3)
        assert eyes.max() == 0.0, (kind, np.argwhere(eyes > 0))
        untouched = alpha == 0
        assert np.array_equal(out[untouched], faces[untouched])
        changed = np.abs(out.astype(int) - faces).max(-1) > 0
        assert changed[alpha == 1].mean() > 0.95  # inside, the face is replaced by the mask
        assert 0.12 < (alpha > 0.5).mean() < 0.45  # a mask, not a stamp or a curtain


def test_masks_cover_nose_and_mouth_not_eyes_on_real_att_faces(att_aligned):
    faces, landmarks = att_aligned
    check_geometry(faces, landmarks, landmarks, seed=0)


def test_masks_cover_nose_and_mouth_not_eyes_on_synthetic_faces():
    faces, truth = synthetic_neutral(24)
    check_geometry(faces, truth, truth, seed=1)  # drawn from the true landmarks
    check_geometry(faces, None, truth, seed=2)  # drawn from the template: the faces sit near it


def test_landmarks_move_the_mask_with_the_face():
    faces, _ = synthetic_neutral(2)
    params = sample_masks(np.random.default_rng(0), 2)
    shifted = ARCFACE_TEMPLATE + [6.0, -4.0]
    _, at_template = render_masks(faces, params, None, return_alpha=True)
    _, moved = render_masks(faces, params, shifted, return_alpha=True)
    np.testing.assert_allclose(moved[:, 20:100, 26:100], at_template[:, 24:104, 20:94], atol=2e-3)


def test_masks_are_deterministic_per_seed_and_varied():
    faces, _ = synthetic_neutral(6)
    a, b = mask_faces(faces, 11), mask_faces(faces, 11)
    assert np.array_equal(a, b) and not np.array_equal(a, mask_faces(faces, 12))
    params = sample_masks(np.random.default_rng(0), 4000)
    kinds = collections.Counter(params.kind.tolist())
    assert set(kinds) == set(range(len(KINDS))) and min(kinds.values()) > 850
    base = np.asarray(list(COLOURS.values()))
    nearest = np.argmin(np.abs(params.colour[:, None, :] / base[None] - 1).max(-1), axis=1)
    share = np.bincount(nearest, minlength=4) / 4000
    np.testing.assert_allclose(share, COLOUR_P, atol=0.025)  # insightface's 0.4 / 0.4 / 0.1 / 0.1
    assert len({tuple(np.round(c, 3)) for c in params.colour}) > 3000  # each mask's shade varies a little


def test_one_batch_renders_as_its_faces_one_by_one():
    faces, truth = synthetic_neutral(5)
    params = sample_masks(np.random.default_rng(4), 5)
    together = render_masks(faces, params, truth)
    for i in range(5):
        alone = render_masks(faces[i], MaskParams.concat([_row(params, i)]), truth[i])
        assert np.abs(alone.astype(int) - together[i]).max() <= 1  # float sums over other windows: ±1 at most


def _row(params: MaskParams, i: int) -> MaskParams:
    return MaskParams(params.kind[i:i + 1], params.colour[i:i + 1], params.shape[i:i + 1], params.offset[i:i + 1])


def test_the_renderer_never_writes_outside_the_image():
    faces, _ = synthetic_neutral(3)
    params = sample_masks(np.random.default_rng(5), 3)
    edge = np.stack([ARCFACE_TEMPLATE + [-60, 30], (ARCFACE_TEMPLATE - 56) * 3 + 56, ARCFACE_TEMPLATE + [0, 500]])
    out, alpha = render_masks(faces, params, edge, return_alpha=True)
    assert out.shape == faces.shape and alpha.shape == (3, 112, 112)
    assert alpha[0].any() and alpha[1].any() and not alpha[2].any()  # partly, mostly, not at all in view
    assert np.array_equal(out[2], faces[2]) and np.array_equal(out[alpha == 0], faces[alpha == 0])


@pytest.mark.parametrize("images, landmarks, message", [
    (np.zeros((2, 112, 112, 3), np.float32), None, "uint8"),
    (np.zeros((2, 112, 100, 3), np.uint8), None, "S×S"),
    (np.zeros((2, 112, 112, 3), np.uint8), np.full((2, 5, 2), np.nan), "finite"),
    (np.zeros((2, 112, 112, 3), np.uint8), np.zeros((2, 4, 2)), "5×2"),
    (np.zeros((2, 112, 112, 3), np.uint8), np.ones((2, 5, 2)), "degenerate"),
])
def test_bad_renderer_input_is_one_line(images, landmarks, message):
    with pytest.raises(UnitsfaceError, match=message) as info:
        render_masks(images, sample_masks(np.random.default_rng(0), 2), landmarks)
    assert "\n" not in str(info.value)
    with pytest.raises(UnitsfaceError, match="unknown mask kind 'scarf'"):
        sample_masks(np.random.default_rng(0), 1, ("scarf",))


# ------------------------------------------------------------------------------------------ detector
def test_yunet_landmarks_align_att_faces_near_the_template(att_aligned, detector):
    _, landmarks = att_aligned
    assert np.abs(landmarks - ARCFACE_TEMPLATE).max() < 9  # eyes, nose, mouth where the template has them
    assert np.abs(landmarks.mean(0) - ARCFACE_TEMPLATE).max() < 3
    blank = np.full((120, 90), 128, np.uint8)
    assert detector.detect(blank) is None
    crop, marks = face_crop(blank, "blank", detector)
    assert crop.shape == (112, 112, 3) and marks is None  # no face: scaled to fit, template stands in


def test_face_crop_and_detector_errors(tmp_path, shared_dir):
    with pytest.raises(UnitsfaceError, match=r"x\.png is 92×112, not a 112×112 aligned face; pass --align"):
        face_crop(np.zeros((112, 92, 3), np.uint8), "x.png")
    sface = shared_dir / "models" / "face_recognition_sface_2021dec_int8bq.onnx"
    with pytest.raises(UnitsfaceError, match="is not a YuNet face detector"):
        FaceDetector(sface)


# ------------------------------------------------------------------------------------------ augmentation
@pytest.fixture(scope="module")
def synthetic_rec(tmp_path_factory) -> Path:
    faces, labels = synthetic_neutral(8)
    out = tmp_path_factory.mktemp("rec")
    write_face_dataset(out, [(i, encode_jpeg(face)) for i, face in enumerate(faces) for _ in range(6)])
    return out


def _epoch(dataset: RecordDataset, epoch: int, workers: int) -> torch.Tensor:
    return torch.cat([images for images, _, _ in make_loader(dataset, 8, workers, seed=3, epoch=epoch)])


def test_mask_augmentation_is_keyed_by_seed_epoch_and_image(synthetic_rec):
    plain = RecordDataset(synthetic_rec, train=True, flip=False)
    masked = RecordDataset(synthetic_rec, train=True, flip=False, mask_prob=0.5)
    reference = _epoch(plain, 0, 0)
    first = _epoch(masked, 0, 0)
    assert torch.equal(first, _epoch(masked, 0, 2))  # worker processes draw the same masks
    assert torch.equal(first, _epoch(masked, 0, 0))
    changed = (first != reference).flatten(1).any(1)
    assert 12 <= int(changed.sum()) <= 36  # about half of the 48 faces
    assert not torch.equal(first, _epoch(masked, 1, 0))  # another epoch, other draws
    resumed = torch.cat([images for images, _, _ in make_loader(masked, 8, 0, seed=3, epoch=0, start_batch=2)])
    assert torch.equal(resumed, first[16:])  # a resumed epoch sees the same masked faces
    off = RecordDataset(synthetic_rec, train=False, mask_prob=0.5)
    assert torch.equal(_epoch(off, 0, 0), _epoch(RecordDataset(synthetic_rec, train=False), 0, 0))
    with pytest.raises(UnitsfaceError, match=r"mask probability must be in \[0, 1\]"):
        RecordDataset(synthetic_rec, mask_prob=1.5)


# ------------------------------------------------------------------------------------------ data mask
@pytest.fixture(scope="module")
def aligned_folder(tmp_path_factory) -> Path:
    faces, _ = synthetic_neutral(6)
    root = tmp_path_factory.mktemp("faces")
    for i, face in enumerate(faces):
        (root / f"id{i}").mkdir()
        for j in range(3):
            (root / f"id{i}" / f"{j}.jpg").write_bytes(encode_jpeg(np.roll(face, j, axis=1)))
        (root / f"id{i}" / "extra.png").write_bytes(encode_png(face))
    return root


def test_data_mask_folder_keeps_layout_and_copies_unmasked_files(aligned_folder, tmp_path, capsys):
    out = tmp_path / "masked"
    assert main(["data", "mask", str(aligned_folder), str(out), "--prob", "0.5", "--seed", "3"]) == 0
    report = capsys.readouterr().out
    files = sorted(p.relative_to(aligned_folder) for p in aligned_folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    same = [f for f in files if (aligned_folder / f).read_bytes() == (out / f).read_bytes()]
    masked = len(files) - len(same)
    assert f"images: {len(files)}\nmasked: {masked}\n" in report and 4 <= masked <= 20
    for f in files:
        if f not in same:
            before, after = decode((aligned_folder / f).read_bytes()), decode((out / f).read_bytes())
            assert np.abs(after[:40].astype(int) - before[:40]).mean() < 3  # the eyes and above: untouched
            mouth = np.abs(after[84:98, 44:68].astype(int) - before[84:98, 44:68]).max(-1)
            assert (mouth > 4).mean() > 0.9  # the mouth: masked
    again = tmp_path / "again"
    assert main(["data", "mask", str(aligned_folder), str(again), "--prob", "0.5", "--seed", "3"]) == 0
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)  # seeded


def test_data_mask_bin_masks_the_first_image_of_each_pair(aligned_folder, tmp_path, capsys):
    faces = [decode((aligned_folder / f"id{i}" / "0.jpg").read_bytes()) for i in range(6)]
    images = [encode_jpeg(faces[i // 2 % 6]) for i in range(12)]
    issame = [True, False, True, False, True, True]
    save_bin(tmp_path / "in.bin", images, issame)
    assert main(["data", "mask", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")]) == 0
    assert "pairs: 6\nmasked: 6" in capsys.readouterr().out
    out_images, out_same = load_bin(tmp_path / "out.bin")
    assert out_same.tolist() == issame
    assert all(out_images[i] == images[i] for i in range(1, 12, 2))  # second images untouched
    assert all(out_images[i] != images[i] for i in range(0, 12, 2))


def test_data_mask_aligns_real_faces_with_a_detector(shared_dir, tmp_path, capsys):
    src = tmp_path / "att"
    (src / "s1").mkdir(parents=True)
    for name in ("1.pgm", "2.pgm"):
        (src / "s1" / name).write_bytes((shared_dir / "data" / "att_faces" / "s1" / name).read_bytes())
    assert main(["data", "mask", str(src), str(tmp_path / "out"), "--prob", "0", "--align",
                 str(yunet(shared_dir))]) == 0
    aligned = decode((tmp_path / "out" / "s1" / "1.pgm").read_bytes())
    assert aligned.shape == (112, 112, 3)  # aligned crops, same names
    assert main(["data", "mask", str(src), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is 92×112, not a 112×112 aligned face; pass --align DETECTOR.onnx (e.g. YuNet) to "
                        "detect and align faces") and "\n" not in err
    assert not (tmp_path / "bad").exists()  # nothing half-written


@pytest.mark.parametrize("argv, message", [
    (["--prob", "2"], "--prob must be in [0, 1], got 2.0"),
    (["--align", "nothere.onnx"], "detector model not found: nothere.onnx"),
])
def test_data_mask_bad_options(aligned_folder, tmp_path, capsys, argv, message):
    assert main(["data", "mask", str(aligned_folder), str(tmp_path / "o"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_data_mask_refuses_a_non_empty_output_and_odd_sources(aligned_folder, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["data", "mask", str(aligned_folder), str(tmp_path / "full")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["data", "mask", str(tmp_path / "nothere"), str(tmp_path / "o")]) == 2
    assert "folder of identities or an existing .bin" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bench + sheet
def test_mask_speed_bench_prints_its_rates():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mask_speed.py"), "--faces", "64", "--batch", "32",
                           "--repeats", "1"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert {"masks_per_s_batched", "masks_per_cpu_s_batched", "masks_per_cpu_s_one_by_one", "jpeg_decodes_per_cpu_s",
            "mask_vs_decode_ratio_batched", "goal_2000_per_cpu_s_met"} <= set(record)


def test_contact_sheet_command(tmp_path, aligned_folder):
    from unitsface.data.masks import main as masks_main

    assert masks_main(["--sheet", str(tmp_path / "s.png"), "--images", str(aligned_folder), "--columns", "4",
                       "--colours", "64"]) == 0
    sheet = Image.open(tmp_path / "s.png")
    assert sheet.size == (4 * 114, (len(KINDS) + 1) * 114) and sheet.mode == "P"


class _WorkerPids(Dataset):
    """16 empty samples labelled with the id of the process that produced them."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        return torch.zeros(3, 2, 2, dtype=torch.uint8), os.getpid(), ()


def test_one_persistent_loader_serves_every_epoch_as_fresh_loaders_would(synthetic_rec):
    """EpochLoader keeps its workers for the whole run; nothing they draw depends on their history, so each
    epoch (and a resumed one, and one after an epoch left half-read) is what a fresh loader gives."""
    masked = RecordDataset(synthetic_rec, train=True, flip=False, mask_prob=0.5)
    loader = EpochLoader(masked, 8, 2, seed=3)
    next(iter(loader(0)))  # an epoch abandoned after one batch (max_steps, an incomplete accumulation group)
    for epoch, start in ((0, 0), (1, 0), (1, 3), (2, 1)):
        got = torch.cat([images for images, _, _ in loader(epoch, start)])
        assert torch.equal(got, _epoch(masked, epoch, 0)[8 * start:]), (epoch, start)
    pids = EpochLoader(_WorkerPids(), 8, 2, seed=0)
    seen = [set(torch.cat([labels for _, labels, _ in pids(epoch)]).tolist()) for epoch in range(3)]
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2] and os.getpid() not in seen[0]
