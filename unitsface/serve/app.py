"""The FastAPI application behind `unitsface serve`.

Routes (every error is JSON `{"error": message}` with a 4xx status, so the page can show it):
    GET  /                      the page (static/index.html: plain HTML + JS, no external resources)
    GET  /api/info              model, threshold in use and its source, samples, validation summary
    GET  /api/histogram.svg     genuine/impostor score densities on the validation set, threshold drawn
    GET  /api/samples/{id}.png  a sample face
    POST /api/verify            multipart: for each side `a`, `b` either an image file or `<side>_sample`
                                (a sample id); returns score, threshold, decision and threshold source

Samples come from the validation `.bin` when one is given (a genuine and an impostor pair);
uploaded faces join them, so a face uploaded once can be compared again without re-uploading.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from unitsface.data.bins import load_bin
from unitsface.data.images import decode, encode_png, image_size, to_face_image
from unitsface.embedder import pair_scores
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.threshold import measure
from unitsface.serve.histogram import histogram_svg
from unitsface.verifier import FaceVerifier

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 50_000_000  # refuse decompression bombs before decoding
MAX_SAMPLES = 16
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around two files


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Sample:
    id: str
    label: str
    face: np.ndarray  # S×S×3 uint8 RGB, as the model sees it
    png: bytes


class Samples:
    """Thread-safe sample faces: the validation ones stay, uploads rotate (oldest dropped first)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Sample] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def add(self, face: np.ndarray, label: str, pinned: bool = False) -> Sample:
        key = hashlib.sha256(face.tobytes()).hexdigest()[:12]
        with self._lock:
            if key not in self._items:
                self._items[key] = Sample(key, label, face, encode_png(face))
                if pinned:
                    self._pinned.add(key)
                uploads = [k for k in self._items if k not in self._pinned]
                if len(self._items) > MAX_SAMPLES and uploads:
                    del self._items[uploads[0]]
            return self._items[key]

    def get(self, key: str) -> Sample:
        with self._lock:
            if key not in self._items:
                raise ApiError(404, f"unknown sample {key!r}")
            return self._items[key]

    def listing(self) -> list[dict[str, str]]:
        with self._lock:
            return [{"id": s.id, "label": s.label} for s in self._items.values()]


def _validation(verifier: FaceVerifier, val_bin: Path, samples: Samples) -> dict[str, Any]:
    """Scores of the validation pairs, their histogram, and sample faces from one pair of each kind."""
    encoded, issame = load_bin(val_bin)
    scores = pair_scores(verifier, encoded)
    for kind, wanted in (("genuine", True), ("impostor", False)):
        hits = np.flatnonzero(issame == wanted)
        if len(hits):
            i = int(hits[0])
            for side in (0, 1):
                face = to_face_image(decode(encoded[2 * i + side], f"{val_bin} image {2 * i + side}"), verifier.size)
                samples.add(face, f"{val_bin.stem} {kind} pair {i + 1}{'AB'[side]}", pinned=True)
    summary: dict[str, Any] = {"file": val_bin.name, "pairs": len(issame), "genuine": int(issame.sum()),
                               "impostor": int((~issame).sum()), "far": None, "frr": None}
    if verifier.operating_point is not None:
        point = measure(verifier.operating_point, scores, issame, val_bin.name)
        summary.update(far=point.far, frr=point.frr)
    return {"summary": summary, "svg": histogram_svg(scores, issame, verifier.threshold)}


def _read_upload(upload: UploadFile, side: str, limit: int) -> bytes:
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"face {side.upper()} ({upload.filename}) is larger than the {limit / 2**20:g} MB limit")
    if not data:
        raise ApiError(400, f"face {side.upper()} ({upload.filename}) is an empty file")
    return data


def create_app(verifier: FaceVerifier, val_bin: str | Path | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The app for one verifier; the validation set (if any) is scored once, here, at startup."""
    samples = Samples()
    validation = _validation(verifier, Path(val_bin), samples) if val_bin else None
    page = (resources.files("unitsface.serve") / "static" / "index.html").read_text(encoding="utf-8")
    app = FastAPI(title="unitsface verify", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"bad request: {where} {first.get('msg', '')}".strip()}, status_code=400)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # Two files plus form overhead at most; refuse before the body is read.
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > 2 * max_upload_bytes + FORM_OVERHEAD:
            return JSONResponse({"error": f"upload too large: {int(length) / 2**20:.1f} MB; each face may be "
                                          f"at most {max_upload_bytes / 2**20:g} MB"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        point = verifier.operating_point
        return {"model": Path(verifier.name).name, "threshold": verifier.threshold,
                "threshold_source": verifier.threshold_source,
                "threshold_far": None if point is None else point.far,
                "threshold_tar": None if point is None else point.tar,
                "threshold_description": verifier.describe_threshold(), "input": verifier.contract,
                "max_upload_bytes": max_upload_bytes, "samples": samples.listing(),
                "validation": validation["summary"] if validation else None}

    @app.get("/api/histogram.svg")
    def histogram() -> Response:
        if validation is None:
            raise ApiError(404, "no validation set: start the server with --val-bin VAL.bin")
        return Response(validation["svg"], media_type="image/svg+xml")

    @app.get("/api/samples/{key}.png")
    def sample_png(key: str) -> Response:
        return Response(samples.get(key).png, media_type="image/png")

    def face_for(side: str, upload: UploadFile | None, sample_id: str | None) -> Sample:
        if upload is not None and upload.filename:
            data = _read_upload(upload, side, max_upload_bytes)
            name = Path(upload.filename).name[:60] or f"upload {side}"
            try:
                height, width = image_size(data, name)
                if height * width > MAX_PIXELS:
                    raise ApiError(400, f"face {side.upper()} ({name}) has {height}×{width} pixels; too large")
                face = to_face_image(decode(data, name), verifier.size)
            except UnitsfaceError:
                raise ApiError(400, f"face {side.upper()} ({name}) is not an image we can read "
                                    "(JPEG, PNG, BMP, PGM, TIFF, WebP)") from None
            return samples.add(face, name)
        if sample_id:
            return samples.get(sample_id)
        raise ApiError(400, f"face {side.upper()} is missing: upload an image or pick a sample")

    @app.post("/api/verify")
    def verify(  # Optional, not `X | None`: FastAPI evaluates these annotations, also on Python 3.9
        a: Optional[UploadFile] = File(None), b: Optional[UploadFile] = File(None),
        a_sample: Optional[str] = Form(None), b_sample: Optional[str] = Form(None),
    ) -> dict[str, Any]:
        first, second = face_for("a", a, a_sample), face_for("b", b, b_sample)
        score = float(verifier.scores([first.face], [second.face])[0])
        same = None if verifier.threshold is None else verifier.decide(score)
        return {"score": score, "threshold": verifier.threshold, "same": same,
                "threshold_source": verifier.threshold_source,
                "a": {"id": first.id, "label": first.label}, "b": {"id": second.id, "label": second.label}}

    return app
