"""The synthetic face set: rendering, determinism, difficulty and the files it writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unitsface.data import synthetic as syn
from unitsface.data.bins import fold_counts, load_bin
from unitsface.data.images import decode
from unitsface.data.recordio import IndexedRecordIO, unpack
from unitsface.errors import UnitsfaceError


def _face(seed: int, identity: int, image: int, difficulty: float = syn.DEFAULT_DIFFICULTY, size: int = 112,
          split: int = syn.TRAIN_SPLIT) -> np.ndarray:
    return syn.render_face(syn.identity_params(seed, split, identity),
                           syn.nuisance_params(seed, split, identity, image, difficulty), size)


def _unit_grey(img: np.ndarray, side: int = 28) -> np.ndarray:
    """The raw-pixel baseline's feature: small grey image, mean removed, unit norm."""
    x = np.asarray(Image.fromarray(img).convert("L").resize((side, side), Image.BILINEAR), np.float64).ravel()
    x -= x.mean()
    return x / np.linalg.norm(x)


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("size", [112, 64, 160])
def test_render_shape_dtype_and_content(size):
    img = _face(0, 3, 1, size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert img.std() > 20  # a face on a background, not a flat fill
    # the face sits on the template: skin-coloured centre differs from the corners (background)
    centre = img[size * 2 // 5:size * 3 // 5, size * 2 // 5:size * 3 // 5].reshape(-1, 3).mean(0)
    assert np.abs(centre - img[:4, :4].reshape(-1, 3).mean(0)).sum() > 10


def test_render_is_deterministic_and_independent_of_cache_order():
    first = _face(5, 2, 7)
    for identity in range(6):  # other identities, expressions and occluders pass through the caches
        for image in range(4):
            _face(5, identity, image)
    assert np.array_equal(first, _face(5, 2, 7))
    assert not np.array_equal(first, _face(6, 2, 7))  # another seed
    assert not np.array_equal(first, _face(5, 2, 8))  # another image of the same identity


def _changed(idp: syn.IdentityParams, base: np.ndarray, nu: syn.NuisanceParams) -> np.ndarray:
    return np.abs(syn.render_face(idp, nu).astype(int) - base).max(axis=2) > 30


def test_occluders_and_expressions_change_only_their_regions():
    idp = syn.identity_params(1, syn.TRAIN_SPLIT, 0)
    neutral = syn.nuisance_params(1, syn.TRAIN_SPLIT, 0, 0, difficulty=0.0)
    base = syn.render_face(idp, neutral)
    for kind, least, rows in (("mask", 1500, (45, 112)), ("cap", 1000, (0, 45)), ("sunglasses", 300, (40, 66)),
                              ("glasses", 150, (40, 66))):
        changed = _changed(idp, base, dataclasses.replace(neutral, occluder=kind, occluder_color=(0.9, 0.1, 0.1)))
        assert changed.sum() > least and changed[rows[0]:rows[1]].sum() == changed.sum(), kind
    mouth = _changed(idp, base, dataclasses.replace(neutral, smile=1.0, mouth_open=0.9))
    assert mouth.sum() > 80 and mouth[80:106].sum() == mouth.sum()
    eyes = _changed(idp, base, dataclasses.replace(neutral, eye_open=0.1))
    assert eyes.sum() > 60 and eyes[42:62].sum() == eyes.sum()
    assert np.array_equal(syn.render_face(idp, neutral), base)  # pasted patches were restored


def test_pose_moves_the_pupils_where_the_template_transform_puts_them():
    for identity in range(4):
        idp = syn.identity_params(2, syn.TRAIN_SPLIT, identity)
        neutral = syn.nuisance_params(2, syn.TRAIN_SPLIT, identity, 0, difficulty=0.0)
        for roll, scale, shift in ((0.0, 1.0, (0.0, 0.0)), (0.15, 1.1, (3.0, -2.0)), (-0.1, 0.9, (-2.5, 1.5))):
            img = syn.render_face(idp, dataclasses.replace(neutral, roll=roll, scale=scale, shift=shift))
            rotation = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
            pivot = np.array([56.0, 70.0])
            for side in (-1, 1):
                pupil = np.array([56.0 + side * idp.eye_dx, idp.eye_y])  # ArcFace eyes: (38, 52), (74, 52)
                assert abs(pupil[0] - (56 + side * 18)) < 3 and abs(pupil[1] - 52) < 4
                x, y = (pivot + shift + scale * rotation @ (pupil - pivot)).astype(int)
                assert img[y - 1:y + 2, x - 1:x + 2].max(axis=2).min() < 50, (identity, roll, side)


def test_blur_pass_is_the_binomial_kernel_and_keeps_flat_images_flat():
    impulse = np.zeros((3, 9, 9), np.float32)
    impulse[:, 4, 4] = 16.0
    kernel = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32)
    out = syn._binomial_blur(impulse)
    assert np.allclose(out[:, 3:6, 3:6], kernel) and out.sum() == pytest.approx(3 * 16.0)
    flat = np.full((3, 7, 7), 100.0, np.float32)
    assert np.allclose(syn._binomial_blur(flat), 100.0)


def test_bad_size_and_difficulty_are_rejected():
    idp, nu = syn.identity_params(0, 0, 0), syn.nuisance_params(0, 0, 0, 0)
    for size in (8, 112.0, 4096):
        with pytest.raises(UnitsfaceError, match="image size"):
            syn.render_face(idp, nu, size)
    for difficulty in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UnitsfaceError, match="difficulty"):
            syn.nuisance_params(0, 0, 0, 0, difficulty)


# ----------------------------------------------------------------------------- identity versus nuisance

def test_difficulty_zero_is_neutral_and_nuisance_scales_linearly():
    zero = syn.nuisance_params(3, 0, 1, 2, difficulty=0.0)
    assert (zero.roll, zero.yaw, zero.pitch, zero.shift, zero.scale, zero.gain) == (0, 0, 0, (0, 0), 1, 1)
    assert (zero.occluder, zero.blur, zero.noise, zero.jpeg_quality, zero.eye_open) == ("none", 0, 0, 95, 1)
    one, two = (syn.nuisance_params(3, 0, 1, 2, d) for d in (1.0, 2.0))
    assert two.roll == pytest.approx(2 * one.roll) and two.shade_x == pytest.approx(2 * one.shade_x)
    assert math.log(two.scale) == pytest.approx(2 * math.log(one.scale))


def test_without_nuisance_an_identity_looks_the_same():
    for identity in range(4):
        images = [_face(4, identity, j, difficulty=0.0) for j in range(3)]
        assert all(np.array_equal(images[0], other) for other in images[1:])
        slight = [_face(4, identity, j, difficulty=0.05).astype(float) for j in range(3)]
        assert max(np.abs(slight[0] - other).mean() for other in slight[1:]) < 8.0
        other_identity = _face(4, identity + 10, 0, difficulty=0.05).astype(float)
        assert np.abs(slight[0] - other_identity).mean() > 12.0


def test_same_identity_is_closer_than_different_identities_on_average():
    genuine, impostor = [], []
    for i in range(50):
        a, b = _unit_grey(_face(8, i, 0)), _unit_grey(_face(8, i, 1))
        genuine.append(a @ b)
        impostor.append(a @ _unit_grey(_face(8, i + 50, 0)))
    assert np.mean(genuine) > np.mean(impostor) + 0.1
    # ... but raw pixels are far from separating them: nuisance makes the task non-trivial
    scores, same = np.array(genuine + impostor), np.array([True] * 50 + [False] * 50)
    best = max(np.mean((scores >= t) == same) for t in scores)
    assert best < 0.9


# ----------------------------------------------------------------------------- pairs and files

def test_pair_plan_has_ten_balanced_folds():
    plan = syn.pair_plan(seed=3, identities=7, pairs=120)
    assert plan.shape == (120, 3)
    for fold in np.split(plan, 10):
        assert list(fold[:, 2]) == [1] * 6 + [0] * 6
    genuine, impostor = plan[plan[:, 2] == 1], plan[plan[:, 2] == 0]
    assert np.array_equal(genuine[:, 0], genuine[:, 1]) and np.all(impostor[:, 0] != impostor[:, 1])
    assert set(plan[:, :2].ravel()) == set(range(7))
    assert np.bincount(genuine[:, 0]).max() - np.bincount(genuine[:, 0]).min() <= 1  # identities used evenly


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "set"
    manifest = syn.write_synthetic_dataset(out, identities=5, images_per_identity=3, seed=11, val_identities=4,
                                           val_pairs=40, heldout_identities=3, heldout_images=2)
    return out, manifest


def test_written_training_set_reads_back(small_set):
    out, manifest = small_set
    reader = IndexedRecordIO(out / "train.idx", out / "train.rec")
    meta, payload = unpack(reader.read(0))
    assert meta.flag == 2 and payload == b"" and list(meta.label) == [16.0, 21.0]  # 15 images, 5 identities
    expected = [syn._render_jpegs((11, syn.TRAIN_SPLIT, i, (0, 1, 2), 112, 1.0)) for i in range(5)]
    for key in range(1, 16):
        header, jpeg = unpack(reader.read(key))
        label, image = divmod(key - 1, 3)
        assert header.flag == 0 and header.label == np.float32(label)
        assert jpeg == expected[label][image]
        assert decode(jpeg).shape == (112, 112, 3)
    for label in range(5):  # identity-meta records give each identity's key range
        assert list(unpack(reader.read(16 + label))[0].label) == [1 + 3 * label, 4 + 3 * label]
    assert (out / "property").read_text().strip() == "5,112,112"
    assert manifest["train"] == {"split": 0, "identities": 5, "images_per_identity": 3, "images": 15}


def test_written_val_bin_has_balanced_disjoint_pairs(small_set):
    out, manifest = small_set
    images, issame = load_bin(out / "val.bin")
    assert len(images) == 80 and issame.dtype == bool and issame.sum() == 20
    assert fold_counts(issame) == [(2, 2)] * 10
    plan = syn.pair_plan(11, 4, 40)
    assert np.array_equal(issame, plan[:, 2] == 1)
    for slot in (0, 1, 5, 79):  # slot 2k+j holds image 2k+j of identity plan[k, j] of the validation split
        identity = int(plan[slot // 2, slot % 2])
        assert images[slot] == syn._render_jpegs((11, syn.VAL_SPLIT, identity, (slot,), 112, 1.0))[0]
    train = {syn.identity_params(11, manifest["train"]["split"], i) for i in range(5)}
    val = {syn.identity_params(11, manifest["val"]["split"], i) for i in range(4)}
    assert len(val) == 4 and not train & val


def test_written_heldout_identities_are_a_third_disjoint_stream(small_set):
    """heldout/<id>/<img>.jpg: every image of the held-out render stream, none of whose identities trains
    or appears in val.bin; 3 identities × 2 images give 2²·3·2/2 = 12 impostor pairs."""
    out, manifest = small_set
    folder = out / syn.HELDOUT_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["id0000", "id0001", "id0002"]
    for i in range(3):
        files = sorted((folder / f"id{i:04d}").iterdir())
        assert [f.name for f in files] == ["00.jpg", "01.jpg"]
        assert [f.read_bytes() for f in files] == syn._render_jpegs((11, syn.HELDOUT_SPLIT, i, (0, 1), 112, 1.0))
    heldout = {syn.identity_params(11, syn.HELDOUT_SPLIT, i) for i in range(3)}
    others = {syn.identity_params(11, split, i) for split, n in ((syn.TRAIN_SPLIT, 5), (syn.VAL_SPLIT, 4))
              for i in range(n)}
    assert len(heldout) == 3 and not heldout & others
    assert manifest["heldout"] == {"split": 2, "folder": "heldout", "identities": 3, "images_per_identity": 2,
                                   "impostor_pairs": 12, "sha256": syn._tree_sha256(folder)}


def test_manifest_describes_the_files(small_set):
    out, manifest = small_set
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["version"] == syn.GENERATOR_VERSION and manifest["seed"] == 11
    assert manifest["image_size"] == 112 and manifest["val"]["pairs"] == 40
    assert set(manifest["files"]) == {"train.rec", "train.idx", "property", "val.bin"}
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": _sha(out / name)}
    assert sorted(p.name for p in out.parent.iterdir()) == ["set"]  # no temp folder left behind


def test_same_seed_same_bytes_other_seed_other_bytes_any_worker_count(tmp_path, small_set):
    _, manifest = small_set
    kwargs = dict(identities=5, images_per_identity=3, val_identities=4, val_pairs=40, heldout_identities=3,
                  heldout_images=2)
    again = syn.write_synthetic_dataset(tmp_path / "again", seed=11, workers=2, **kwargs)
    assert again["files"] == manifest["files"] and again["heldout"] == manifest["heldout"]
    other = syn.write_synthetic_dataset(tmp_path / "other", seed=12, **kwargs)
    assert all(other["files"][f]["sha256"] != manifest["files"][f]["sha256"] for f in ("train.rec", "val.bin"))
    assert other["heldout"]["sha256"] != manifest["heldout"]["sha256"]


def test_existing_output_and_failures_leave_no_half_written_set(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    kwargs = dict(identities=2, images_per_identity=1, seed=0, val_identities=2, val_pairs=20, heldout_identities=2,
                  heldout_images=2)
    with pytest.raises(UnitsfaceError, match="already exists"):
        syn.write_synthetic_dataset(out, **kwargs)

    def broken(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(syn, "save_bin", broken)
    with pytest.raises(OSError, match="disk full"):
        syn.write_synthetic_dataset(out, overwrite=True, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and (out / "keep.txt").exists()
    monkeypatch.undo()
    syn.write_synthetic_dataset(out, overwrite=True, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["heldout", "manifest.json", "property", "train.idx", "train.rec",
                                                     "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("bad, match", [
    (dict(val_pairs=30), "multiple of 20"), (dict(identities=0), "identities"), (dict(val_identities=1), "val_"),
    (dict(seed=-1), "seed"), (dict(image_size=8), "image size"), (dict(workers=0), "workers"),
    (dict(difficulty=-1.0), "difficulty"), (dict(heldout_identities=1), "heldout_identities"),
    (dict(heldout_images=1), "heldout_images"),
])
def test_bad_arguments_are_rejected_before_writing(tmp_path, bad, match):
    kwargs = dict(identities=3, images_per_identity=2, seed=0, val_pairs=20) | bad
    with pytest.raises(UnitsfaceError, match=match):
        syn.write_synthetic_dataset(tmp_path / "set", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- preview and speed

def test_contact_sheet_and_preview_command(tmp_path, capsys):
    sheet = syn.contact_sheet(seed=2, identities=2, images=3, size=64)
    assert sheet.shape == (2 * 66, 3 * 66, 3) and sheet.dtype == np.uint8
    assert np.all(sheet[64:66] == 255)  # the gap between rows
    assert not np.array_equal(sheet[:64, :64], sheet[66:130, :64])  # two identities
    path = tmp_path / "sheet.png"
    assert syn.main(["--preview", str(path), "--identities", "2", "--images", "3", "--size", "64", "--seed", "2"]) == 0
    assert np.array_equal(np.asarray(Image.open(path)), sheet)
    assert syn.main(["--preview", str(path), "--identities", "0"]) == 2
    assert "error: contact sheet" in capsys.readouterr().err
