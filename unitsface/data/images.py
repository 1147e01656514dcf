"""Image decoding/encoding for face data, and the image-folder layout.

JPEG goes through simplejpeg (libjpeg-turbo, several times faster than Pillow's decoder,
which matters because decoding is the data loader's main cost); everything else
(PNG, PGM, BMP, CMYK JPEG, ...) falls back to Pillow. Decoding always yields RGB, the
channel order of every toolkit we read from (formats.md §9.3); a model's own colour
order is applied at the network input, not here.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from unitsface.errors import UnitsfaceError, one_line

FACE_SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
# The Pillow formats of IMAGE_EXTENSIONS. Pillow otherwise guesses among dozens of formats, some
# without a signature (TGA), so random bytes could "open" as an image with a made-up header.
PIL_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
# 64 Mpixel (8192²; 192 MiB as RGB): far beyond any face photo. A larger size read from a header is
# taken for damage and refused before a decoder allocates the pixels (a flipped bit in a JPEG SOF can
# claim 65535² = 12 GiB).
MAX_PIXELS = 1 << 26
_JPEG_SOI = b"\xff\xd8"


def is_jpeg(data: bytes) -> bool:
    return bytes(data[:2]) == _JPEG_SOI


def _check_pixels(height: int, width: int, source: str) -> None:
    if height * width > MAX_PIXELS:
        raise UnitsfaceError(f"{source}: a {width}x{height} image exceeds the {MAX_PIXELS}-pixel limit "
                             "(a damaged header?)")


def _open(data: bytes, source: str) -> Image.Image:
    """A lazily decoded Pillow image of one of PIL_FORMATS whose size passed the pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # our own limit is lower anyway
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    _check_pixels(img.height, img.width, source)
    return img


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its message names a BytesIO object
        return f"not a {', '.join(PIL_FORMATS)} image"
    return one_line(exc)


def decode(data: bytes, source: str = "image") -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 RGB array.

    `source` only names the data in the error message (a file or record key). Whatever the
    bytes, the outcome is an image or a one-line UnitsfaceError: decoders fail on damaged data
    in many ways (OSError, ValueError, SyntaxError, struct.error, ...), all of which mean
    "cannot decode".
    """
    try:
        if is_jpeg(data):
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                _check_pixels(height, width, source)
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                pass  # CMYK, arithmetic coding, ...: let Pillow try before giving up
        with _open(data, source) as img:
            return np.asarray(img.convert("RGB"))
    except UnitsfaceError:
        raise
    except Exception as exc:
        raise UnitsfaceError(f"cannot decode {source} ({len(data)} bytes): {_reason(exc)}") from None


def image_size(data: bytes, source: str = "image") -> tuple[int, int]:
    """(height, width) read from the image header only, without decoding pixels."""
    try:
        if is_jpeg(data):
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        else:
            with _open(data, source) as img:
                height, width = img.height, img.width
        _check_pixels(height, width, source)
        return int(height), int(width)
    except UnitsfaceError:
        raise
    except Exception as exc:
        raise UnitsfaceError(f"cannot read the size of {source}: {_reason(exc)}") from None


def _rgb(img: np.ndarray) -> np.ndarray:
    """Any uint8 HxW, HxWx1, HxWx3 or HxWx4 array as a contiguous HxWx3 RGB array."""
    if img.dtype != np.uint8:
        raise UnitsfaceError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise UnitsfaceError(f"expected an HxW or HxWxC image with C in 1, 3, 4; got shape {img.shape}")
    return np.ascontiguousarray(img)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes (4:2:0, like OpenCV's default) of an RGB or greyscale uint8 image."""
    return simplejpeg.encode_jpeg(_rgb(img), quality=int(quality), colorspace="RGB", colorsubsampling="420")


def encode_png(img: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(img)).save(buffer, format="PNG")
    return buffer.getvalue()


def to_face_image(img: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """`img` as a size×size RGB image: scaled to fit, aspect kept, centred on black.

    Black padding matches the border value of the ArcFace alignment warp (formats.md §9.1),
    so padded images look like aligned crops near the edges rather than stretched faces.
    """
    img = _rgb(img)
    height, width = img.shape[:2]
    if (height, width) == (size, size):
        return img
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def face_jpeg(data: bytes, size: int = FACE_SIZE, quality: int = 95, source: str = "image") -> bytes:
    """Encoded bytes as a size×size JPEG; a JPEG that already is one is returned untouched.

    Keeping conforming JPEGs byte-for-byte avoids a second lossy encode when packing data
    that is already aligned; decoding it anyway proves it is readable before it is packed.
    """
    img = decode(data, source)
    if is_jpeg(data) and img.shape[:2] == (size, size):
        return data
    return encode_jpeg(to_face_image(img, size), quality)


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes and (image path, label) of a `root/<identity>/<image>` tree.

    Classes are the sorted sub-folder names, label = position in that list (torchvision
    `ImageFolder` order, formats.md §10); images are sorted by name within a class.
    Folders without images still get a label so that labels equal folder positions.
    """
    root = Path(root)
    if not root.is_dir():
        raise UnitsfaceError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UnitsfaceError(f"no identity sub-folders in {root} (expected root/<identity>/<image>)")
    items = [
        (root / name / file, label)
        for label, name in enumerate(classes)
        for file in sorted(os.listdir(root / name))
        if file.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not items:
        raise UnitsfaceError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<identity>/")
    return classes, items


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an H×W×3 uint8 RGB array; UnitsfaceError naming the file if it can't be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnitsfaceError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode(data, source=str(path))


def list_images(spec: str | os.PathLike) -> list[Path]:
    """Image paths from a folder (searched recursively, sorted) or a text file of paths, one a line.

    Relative paths in a list file are taken relative to the list file's folder, so a list and
    its images can move together; blank lines and lines starting with '#' are skipped.
    """
    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise UnitsfaceError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {spec}")
        return paths
    if not spec.is_file():
        raise UnitsfaceError(f"images not found: {spec} is neither a folder nor a list file")
    lines = [line.strip() for line in spec.read_text().splitlines()]
    paths = [spec.parent / line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UnitsfaceError(f"list file {spec} names no images")
    return paths
