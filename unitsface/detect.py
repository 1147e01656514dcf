"""Five-landmark face detection with a YuNet ONNX model, for images that are not aligned crops yet.

Masks and models need faces aligned to the ArcFace template, and alignment needs the five
landmarks a detector finds. YuNet (OpenCV zoo, `face_detection_yunet_*.onnx`) is small, fast on a
CPU and returns exactly those five points; the user supplies the file (nothing is downloaded).
The decoder follows OpenCV's `FaceDetectorYN`: per stride 8/16/32 anchor grid, score
sqrt(cls·obj), box and landmarks as offsets in stride units. Only the best face is used: these
tools align one face per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unitsface.align import align_face_landmarks
from unitsface.data.images import to_face_image
from unitsface.errors import UnitsfaceError

STRIDES = (8, 16, 32)
MIN_SCORE = 0.5  # below this the best candidate is not taken for a face
CANVAS = 640  # input side of the zoo models; images are scaled into it


@dataclass(frozen=True)
class Detection:
    score: float
    box: np.ndarray  # x, y, width, height in image pixels
    landmarks: np.ndarray  # 5×2 (x, y): eyes, nose tip, mouth corners, left/right as seen in the image


class FaceDetector:
    """A YuNet ONNX graph with its decoder; `detect(image)` gives the most confident face or None."""

    def __init__(self, path: str | Path, min_score: float = MIN_SCORE) -> None:
        from unitsface.export.onnx import load_onnx  # lazy: unitsface.export loads torch

        self.model = load_onnx(path)
        names = {output.name for output in self.model.session.get_outputs()}
        wanted = {f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in STRIDES}
        if not wanted <= names:
            raise UnitsfaceError(f"{path} is not a YuNet face detector: it lacks outputs "
                                 f"{', '.join(sorted(wanted - names))}")
        self.canvas = self.model.input_size or CANVAS
        self.min_score = min_score

    def detect(self, image: np.ndarray) -> Detection | None:
        """The best face of an RGB (or grey) uint8 image, in its own pixel coordinates."""
        picture = Image.fromarray(np.asarray(image)).convert("RGB")
        longest = max(picture.size)
        # Large photos shrink to fit; small crops grow to half the canvas, where YuNet is most reliable.
        scale = min(self.canvas / longest, max(1.0, self.canvas / 2 / longest))
        width, height = max(1, round(picture.width * scale)), max(1, round(picture.height * scale))
        canvas = np.zeros((self.canvas, self.canvas, 3), np.float32)
        canvas[:height, :width] = np.asarray(picture.resize((width, height), Image.BILINEAR))[..., ::-1]  # BGR
        names = [output.name for output in self.model.session.get_outputs()]
        out = dict(zip(names, self.model.session.run(None, {self.model.input_name: canvas.transpose(2, 0, 1)[None]})))
        best: tuple[float, int, int] | None = None
        for stride in STRIDES:
            score = np.sqrt(np.clip(out[f"cls_{stride}"][0, :, 0], 0, 1) * np.clip(out[f"obj_{stride}"][0, :, 0], 0, 1))
            i = int(np.argmax(score))
            if score[i] >= self.min_score and (best is None or score[i] > best[0]):
                best = (float(score[i]), stride, i)
        if best is None:
            return None
        score, stride, i = best
        row, col = divmod(i, self.canvas // stride)
        cx, cy, w, h = out[f"bbox_{stride}"][0, i]
        box = np.array([(col + cx) * stride, (row + cy) * stride, np.exp(w) * stride, np.exp(h) * stride])
        box[:2] -= box[2:] / 2
        points = (out[f"kps_{stride}"][0, i].reshape(5, 2) + [col, row]) * stride
        # Back to the image: pixel centres scale as (x + 0.5) / s - 0.5 under a whole-image resize.
        factor = np.array([width / picture.width, height / picture.height])
        return Detection(score, np.r_[(box[:2] + 0.5) / factor - 0.5, box[2:] / factor], (points + 0.5) / factor - 0.5)


def face_crop(image: np.ndarray, source: str, detector: FaceDetector | None = None,
              size: int = 112) -> tuple[np.ndarray, np.ndarray | None]:
    """(size×size RGB aligned face, its five landmarks in the crop, or None where unknown).

    Without a detector the image must already be an aligned size×size crop (its landmarks are then
    the template's, which callers use when they get None). With one, the best face is aligned by its
    landmarks; an image where none is found is scaled to fit (None: the template stands in).
    """
    image = np.asarray(image)
    if detector is None:
        if image.shape[:2] != (size, size):
            raise UnitsfaceError(f"{source} is {image.shape[1]}×{image.shape[0]}, not a {size}×{size} aligned face; "
                                 "pass --align DETECTOR.onnx (e.g. YuNet) to detect and align faces")
        return to_face_image(image, size), None
    found = detector.detect(image)
    if found is None:
        return to_face_image(image, size), None
    crop, landmarks = align_face_landmarks(image, found.landmarks, size)
    return to_face_image(crop, size), landmarks
