"""`unitsface serve`: the HTTP API on a real server, and the page itself in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET

import pytest
from deploy_helpers import att_bin, att_face, make_checkpoint

from unitsface.data.bins import load_bin
from unitsface.embedder import pair_scores
from unitsface.evaluation.verification import far_frr_at
from unitsface.verifier import FaceVerifier

IN_CI = bool(os.environ.get("CI"))
if not IN_CI:  # in CI the serve extra is installed and these tests must run
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from unitsface.serve import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def material(tmp_path_factory, shared_dir):
    folder = tmp_path_factory.mktemp("serve")
    model = make_checkpoint(folder / "model.pt")
    val = att_bin(shared_dir, folder / "val.bin", people=4)
    notes = folder / "notes.txt"
    notes.write_text("this is not a face\n")
    return {"model": model, "val": val, "notes": notes, "verifier": FaceVerifier.load(model)}


@pytest.fixture(scope="module")
def server(material):
    """The app on a real uvicorn server, on a free loopback port, in a thread."""
    app = create_app(material["verifier"], material["val"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)
    sock.close()


def post_files(base: str, **files) -> httpx.Response:
    """POST /api/verify with `side=path` files or `side_sample=id` fields."""
    uploads = {k: (v.name, v.read_bytes()) for k, v in files.items() if not k.endswith("_sample")}
    fields = {k: v for k, v in files.items() if k.endswith("_sample")}
    return httpx.post(f"{base}/api/verify", files=uploads or None, data=fields, timeout=60)


def test_info_reports_threshold_samples_and_validation(server, material):
    info = httpx.get(f"{server}/api/info").json()
    assert (info["threshold"], info["threshold_source"]) == (0.31, "learned b/s")
    assert [s["label"] for s in info["samples"][:4]] == ["val genuine pair 1A", "val genuine pair 1B",
                                                        "val impostor pair 2A", "val impostor pair 2B"]
    encoded, issame = load_bin(material["val"])
    far, frr = far_frr_at(pair_scores(material["verifier"], encoded), issame, 0.31)
    assert info["validation"] == {"file": "val.bin", "pairs": 8, "genuine": 4, "impostor": 4, "far": far, "frr": frr}


def test_histogram_draws_both_classes_and_the_threshold(server):
    response = httpx.get(f"{server}/api/histogram.svg")
    assert response.headers["content-type"].startswith("image/svg+xml")
    svg = ET.fromstring(response.text)
    ns = {"s": "http://www.w3.org/2000/svg"}
    for kind in ("genuine", "impostor"):
        assert len(svg.findall(f"s:g[@class='{kind}']/s:rect", ns)) >= 1
    line = svg.find("s:line[@id='threshold-line']", ns)
    x0, x1, left, width = (float(svg.get(k)) for k in ("data-x0", "data-x1", "data-left", "data-width"))
    assert float(line.get("x1")) == pytest.approx(left + (0.31 - x0) / (x1 - x0) * width, abs=0.06)


def test_verify_two_uploads_and_then_their_samples(server, material, shared_dir):
    a, b = att_face(shared_dir, 1, 1), att_face(shared_dir, 2, 1)
    body = post_files(server, a=a, b=b).json()
    expected = material["verifier"].score(a, b)
    assert body["score"] == pytest.approx(expected, abs=1e-5)
    assert body["same"] == (expected >= 0.31) and body["threshold_source"] == "learned b/s"
    again = post_files(server, a_sample=body["a"]["id"], b_sample=body["b"]["id"]).json()
    assert again["score"] == pytest.approx(body["score"], abs=1e-6) and again["a"]["label"] == "1.pgm"
    png = httpx.get(f"{server}/api/samples/{body['a']['id']}.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


def test_bad_requests_get_clear_json_errors(server, material, shared_dir, tmp_path):
    face = att_face(shared_dir, 1, 1)
    response = post_files(server, a=material["notes"], b=face)
    assert response.status_code == 400
    assert response.json() == {"error": "face A (notes.txt) is not an image we can read "
                                        "(JPEG, PNG, BMP, PGM, TIFF, WebP)"}
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + bytes(5 * 2**20))
    response = post_files(server, a=face, b=big)
    assert response.status_code == 413 and response.json()["error"] == \
        "face B (big.jpg) is larger than the 5 MB limit"
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(bytes(11 * 2**20))
    response = post_files(server, a=huge, b=face)
    assert response.status_code == 413 and response.json()["error"].startswith("upload too large: 11.0 MB")
    response = post_files(server, a=face)
    assert response.status_code == 400 and "face B is missing" in response.json()["error"]
    response = post_files(server, a=face, b_sample="nope")
    assert response.status_code == 404 and response.json() == {"error": "unknown sample 'nope'"}


def test_page_loads_nothing_from_elsewhere(server):
    page = httpx.get(server).text
    assert "<title>" in page and not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)


def test_server_binds_loopback_by_default():
    from unitsface.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m.pt"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


# ------------------------------------------------------------------------------------------ the browser
def chromium_available() -> bool:
    if not os.path.exists(CHROMIUM):
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture()
def browser_page(tmp_path):
    if not chromium_available():
        if IN_CI:
            pytest.fail(f"chromium ({CHROMIUM}) or playwright missing in CI: run scripts/install-browser.sh")
        pytest.skip("chromium or playwright not installed (scripts/install-browser.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


def test_page_in_chromium_compares_faces_and_shows_errors(browser_page, server, material, shared_dir):
    page = browser_page
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('learned b/s')")
    page.wait_for_selector("#histogram svg #threshold-line", state="attached")

    a, b = att_face(shared_dir, 3, 1), att_face(shared_dir, 3, 2)
    page.set_input_files("#file-a", str(a))
    page.set_input_files("#file-b", str(b))
    page.click("#compare")
    page.wait_for_selector("#result", state="visible")
    expected = material["verifier"].score(a, b)
    assert float(page.text_content("#score")) == pytest.approx(expected, abs=1e-4)
    assert page.text_content("#threshold") == "0.3100"
    assert page.text_content("#decision") == ("same person" if expected >= 0.31 else "different people")
    assert page.locator("#histogram svg #score-line").count() == 1
    # PGM uploads cannot be previewed by a browser: the preview becomes the face the model saw.
    page.wait_for_function("document.getElementById('preview-a').naturalWidth === 112")

    page.set_input_files("#file-a", str(material["notes"]))
    page.click("#compare")
    page.wait_for_selector("#error", state="visible")
    assert "face A (notes.txt) is not an image" in page.text_content("#error")
    assert "HTTP 400" in page.text_content("#error") and page.is_hidden("#result")

    # Pick the validation impostor pair from the sample strips instead of uploading.
    page.click("#samples-a button[title='val impostor pair 2A']")
    page.click("#samples-b button[title='val impostor pair 2B']")
    page.click("#compare")
    page.wait_for_selector("#result", state="visible")
    encoded, _ = load_bin(material["val"])
    expected = float(pair_scores(material["verifier"], encoded[2:4])[0])
    assert float(page.text_content("#score")) == pytest.approx(expected, abs=1e-4)
