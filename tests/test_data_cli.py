"""`unitsface data ...` end to end through `unitsface.cli.main` on real faces and real list formats."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from PIL import Image

from unitsface.cli import main
from unitsface.data.bins import load_bin
from unitsface.data.images import decode
from unitsface.data.recordio import IndexedRecordIO, scan_dataset, unpack
from unitsface.data.tools import read_lfw_pairs


def _run(capsys, *argv: str) -> dict[str, str]:
    assert main(["data", *map(str, argv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.split(": ", 1) for line in lines)


@pytest.fixture(scope="module")
def att_jpeg(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("att") / "jpeg"
    assert main(["data", "import", str(shared_dir / "data" / "att_faces"), str(out), "--workers", "2"]) == 0
    return out


def test_import_converts_grey_pgm_to_rgb_face_jpegs(att_jpeg, shared_dir):
    files = sorted(att_jpeg.glob("*/*.jpg"))
    assert len(files) == 400 and len(list(att_jpeg.iterdir())) == 40
    with Image.open(att_jpeg / "s7" / "3.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (112, 112))
    original = np.asarray(Image.open(shared_dir / "data" / "att_faces" / "s7" / "3.pgm"), dtype=int)
    converted = decode((att_jpeg / "s7" / "3.jpg").read_bytes()).astype(int)
    assert np.abs(converted[:, 10:102, 1] - original).mean() < 2.5  # centred, 10 px padding each side


def test_pack_and_inspect(att_jpeg, tmp_path, capsys):
    report = _run(capsys, "pack", att_jpeg, tmp_path / "rec", "--workers", "2")
    assert (report["images"], report["identities"], report["records"]) == ("400", "40", "441")
    assert (tmp_path / "rec" / "property").read_text().strip() == "40,112,112"
    sheet = tmp_path / "sheet.png"
    report = _run(
        capsys, "inspect", tmp_path / "rec", "--sheet", sheet, "--sheet-identities", "5", "--sheet-images", "4"
    )
    assert report["images"] == "400" and report["identities"] == "40" and report["label_range"] == "0..39"
    assert report["image_size"] == "112x112" and report["layout"].startswith("insightface")
    assert report["images_per_identity"] == "min 10, median 10, max 10"
    with Image.open(sheet) as img:
        assert img.size == (4 * 112, 5 * 112)
        tile = np.asarray(img.convert("RGB"))[112:224, 112:224]  # identity 2nd chosen, image 2
    assert tile.std() > 20  # a face, not an empty tile


def test_pack_from_im2rec_lst(att_jpeg, tmp_path, capsys):
    # an im2rec --list --recursive file: index, %f label, relative path; shuffled with a fixed seed
    rows = [
        (i, label, f"{name}/{file.name}")
        for i, (label, name, file) in enumerate(
            (label, d.name, f) for label, d in enumerate(sorted(att_jpeg.iterdir())) for f in sorted(d.iterdir())
        )
    ]
    random.Random(100).shuffle(rows)
    lst = tmp_path / "att.lst"
    lst.write_text("".join(f"{i}\t{label:f}\t{path}\n" for i, label, path in rows))
    assert "\t3.000000\t" in lst.read_text()
    report = _run(capsys, "pack", lst, tmp_path / "rec", "--root", att_jpeg)
    assert report["images"] == "400" and report["identities"] == "40"
    index = scan_dataset(tmp_path / "rec")
    assert index.has_meta and np.all(np.diff(index.labels) >= 0)
    first_of_s10 = next(path for i, label, path in sorted(rows) if label == 1)
    with IndexedRecordIO(tmp_path / "rec" / "train.idx", tmp_path / "rec" / "train.rec") as reader:
        key = int(index.keys[index.labels == 1][0])
        assert unpack(reader.read(key))[1] == (att_jpeg / first_of_s10).read_bytes()


def test_real_lfw_pairs_list_parses(shared_dir):
    pairs = read_lfw_pairs(shared_dir / "data" / "lfw_pairs" / "pairs.txt")
    same = [a == c for a, _, c, _ in pairs]
    assert len(pairs) == 6000 and sum(same) == 3000
    assert same[:300] == [True] * 300 and same[300:600] == [False] * 300
    assert pairs[0] == ("Abel_Pacheco", 1, "Abel_Pacheco", 4)


def test_make_bin_from_lfw_pairs(shared_dir, tmp_path, capsys):
    lfw = shared_dir / "data" / "lfw_pairs"
    lines = lfw.joinpath("pairs.txt").read_text().splitlines()
    chosen = [lines[0]] + lines[1:4] + [line for line in lines if line.startswith("Anthony_Hopkins")] + lines[301:303]
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("\n".join(chosen) + "\n")
    # an LFW-layout tree: the two real Anthony Hopkins images, AT&T faces for the other names
    root = tmp_path / "lfw"
    att = sorted((shared_dir / "data" / "att_faces").glob("s*"))
    for name, number, name2, number2 in read_lfw_pairs(pairs_file):
        for who, n in ((name, number), (name2, number2)):
            dest = root / who / f"{who}_{n:04d}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = lfw / "images" / who / dest.name
            if source.is_file():
                shutil.copy(source, dest)
            else:
                Image.open(att[sum(map(ord, who)) % 40] / f"{n % 10 + 1}.pgm").convert("RGB").save(dest)
    report = _run(capsys, "make-bin", tmp_path / "lfw.bin", "--pairs-file", pairs_file, "--root", root)
    assert report["pairs"] == str(len(chosen) - 1)
    images, issame = load_bin(tmp_path / "lfw.bin")
    assert issame.tolist() == [True] * 3 + [True, False] + [False, False]
    hopkins = decode(images[6])  # Anthony_Hopkins 1 2 is the fourth pair; 250x250 -> 112x112
    expected = np.asarray(
        Image.open(lfw / "images" / "Anthony_Hopkins" / "Anthony_Hopkins_0001.jpg").resize((112, 112))
    )
    assert hopkins.shape == (112, 112, 3) and np.abs(hopkins.astype(int) - expected).mean() < 6
    report = _run(capsys, "inspect", tmp_path / "lfw.bin")
    assert (report["pairs"], report["same"], report["different"]) == ("7", "4", "3")


def test_make_bin_from_folder_is_balanced_and_seeded(att_jpeg, tmp_path, capsys):
    for name in ("a.bin", "b.bin"):
        _run(capsys, "make-bin", tmp_path / name, "--from-folder", att_jpeg, "--pairs", "200", "--seed", "3")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    images, issame = load_bin(tmp_path / "a.bin")
    assert len(images) == 400 and issame.sum() == 100
    pairs = {(images[2 * i], images[2 * i + 1]) for i in range(200)}
    assert len(pairs) == 200  # no repeated pair
    report = _run(capsys, "inspect", tmp_path / "a.bin")
    assert report["fold_same_different"] == " ".join(["10/10"] * 10)


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["data", "pack", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: pack source must be an image folder or an existing .lst file: {tmp_path / 'nowhere'}"
    )
    (tmp_path / "pairs.txt").write_text("10\t300\nNobody\t1\t2\n")
    assert (
        main(
            [
                "data",
                "make-bin",
                str(tmp_path / "x.bin"),
                "--pairs-file",
                str(tmp_path / "pairs.txt"),
                "--root",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: image ") and "Nobody_0001.jpg" in err and err.count("\n") == 1
    folder = tmp_path / "src" / "alice"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    assert main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "no images to write" in capsys.readouterr().err
    Image.new("L", (50, 60), 128).save(folder / "ok.png")
    report = _run(capsys, "pack", tmp_path / "src", tmp_path / "out")
    assert report["images"] == "1" and report["bad_files"] == "1" and "broken.jpg" in report["bad_examples"]


def test_synth_writes_a_dataset_the_data_tools_read(tmp_path, capsys):
    pytest.importorskip("unitsface.data.synthetic")
    out = tmp_path / "synth"
    args = ["synth", "--out", out, "--identities", "3", "--images-per-identity", "2", "--seed", "1"]
    _run(capsys, *args, "--val-identities", "4", "--val-pairs", "20")
    index = scan_dataset(out)
    assert index.has_meta and index.labels.tolist() == [0, 0, 1, 1, 2, 2]
    images, issame = load_bin(out / "val.bin")
    assert len(images) == 40 and issame.sum() == 10
