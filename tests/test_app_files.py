"""The app's files on a public Space (issue 33, findings 2-7): what a user may write to the server's
disk is bounded and gone after the app stops (SIGTERM too), gallery adds leave no empty files,
out-of-range numbers and huge images get the app's own one-line refusal, and the test suite itself
leaves nothing in the temporary folder. Driven through the launched ``python app.py``, with
gradio_client and, where the issue's requests came from there, the raw HTTP API."""

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import CAT, ROOT, app_process, rank

UPLOADS_MAX_MB = 60
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in files_under(folder)) / 2**20


def random_png(path: Path, mb: float) -> Path:
    """A file of ``mb`` MiB that starts like a PNG (the size is what is under test, not the pixels)."""
    path.write_bytes(PNG_HEADER + os.urandom(int(mb * 2**20) - len(PNG_HEADER)))
    return path


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """``python app.py`` with its own upload folder, an upload bound of ``UPLOADS_MAX_MB`` and a log:
    (its gradio_client, its URL, the upload folder, the log file)."""
    uploads, log = tmp_path_factory.mktemp("uploads"), tmp_path_factory.mktemp("log") / "app.log"
    env = {"GRADIO_TEMP_DIR": str(uploads), "ADAPT_UPLOADS_MAX_MB": str(UPLOADS_MAX_MB),
           "ADAPT_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with app_process(env, log=log) as client:
        yield client, client.src, uploads, log


def call(url: str, api_name: str, data: list) -> tuple[str, object]:
    """A raw ``/gradio_api/call/<api_name>`` request: the final event, "complete" with the outputs or
    "error" with its message."""
    with httpx.Client(base_url=url, timeout=120) as http:
        event_id = http.post(f"gradio_api/call/{api_name}", json={"data": data}).raise_for_status().json()["event_id"]
        event = None
        with http.stream("GET", f"gradio_api/call/{api_name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event == "complete":
                    return event, json.loads(line[len("data: "):])
                elif line.startswith("data: ") and event == "error":
                    return event, json.loads(line[len("data: "):])["error"]
    raise AssertionError("the stream ended without a result")


def upload(url: str, *paths: Path) -> httpx.Response:
    """A raw ``/gradio_api/upload`` request with ``paths``, the way a client adds files."""
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files=files, timeout=120)


# Finding 2: a pasted image is a data URL in the request, checked against the same limit as an upload.

def test_a_pasted_data_url_over_the_upload_limit_is_refused_unwritten(served_app, tmp_path):
    _, url, uploads, _ = served_app
    big = random_png(tmp_path / "big.png", 26)
    pasted = {"path": None, "url": "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode(),
              "orig_name": "pasted.png", "meta": {"_type": "gradio.FileData"}}
    event, message = call(url, "rank_captions", [pasted, "a cat", None, False])
    assert event == "error" and "25 MB" in message and "pasted.png" in message, message
    assert all(p.stat().st_size < 2**20 * 25 for p in files_under(uploads)), "nothing that large was written"
    small = {**pasted, "url": "data:image/png;base64," + base64.b64encode(Path(CAT).read_bytes()).decode()}
    event, result = call(url, "rank_captions", [small, "a cat", None, False])
    assert event == "complete" and result[0]["data"][0][1] == "a cat", "a pasted image within the limit is ranked"


# Finding 3: the upload folder is bounded, and emptied when the app is stopped as a Space stops it.

def test_the_upload_folder_stays_within_its_bound(served_app, tmp_path):
    _, url, uploads, _ = served_app
    sent = [random_png(tmp_path / f"flood{i}.png", 10) for i in range(8)]
    answers = [upload(url, path) for path in sent]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert megabytes(uploads) <= UPLOADS_MAX_MB, "80 MB sent, the oldest deleted beyond the bound"
    assert Path(answers[-1].json()[0]).is_file(), "the newest upload is kept"
    assert not Path(answers[0].json()[0]).exists(), "the oldest upload is deleted"
    too_big = upload(url, *sent[:7])
    assert too_big.status_code == 413 and f"{UPLOADS_MAX_MB} MB" in too_big.text
    assert megabytes(uploads) <= UPLOADS_MAX_MB


def test_sigterm_deletes_uploads_and_drawings_like_ctrl_c(tmp_path):
    uploads = tmp_path / "uploads"
    with app_process({"GRADIO_TEMP_DIR": str(uploads), "ADAPT_CACHE_DIR": str(tmp_path / "cache")},
                     stop=signal.SIGTERM) as client:
        drawing = rank(client, handle_file(CAT), "a cat", scoring=None)[1]
        assert Path(drawing).is_file()
        assert len(files_under(uploads)) >= 2, "the upload and the drawing"
    # Only the empty folder Gradio makes in its temporary folder whenever it is imported may stay.
    assert [p.name for p in uploads.rglob("*")] in ([], ["vibe_edit_history"]), "a Space's restart leaves nothing"


# Finding 4: gr.File's preprocessing wrote an empty file per added image.

def test_adding_images_leaves_no_empty_files(served_app, tmp_path):
    client, _, uploads, _ = served_app
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"cat{i}.jpg")
        photos[-1].write_bytes(Path(CAT).read_bytes())
    status = client.predict([handle_file(str(p)) for p in photos], api_name="/add_images")[0]
    assert "of yours" in status
    assert [p for p in files_under(uploads) if p.stat().st_size == 0] == []


# Finding 5: out-of-range numbers from the API are one warning line, not a traceback.

def test_out_of_range_numbers_are_refused_in_one_line(served_app):
    client, _, _, log = served_app
    start = log.stat().st_size
    for top_k in (0, -5, 1e9, 2.5):
        with pytest.raises(AppError, match=r"^Ask for 1 to 50 results\."):
            client.predict("a cat", top_k, api_name="/search_gallery")
    rank(client, handle_file(CAT), "a cat\na dog", scoring=None)
    for number in (0, -1, 3):
        with pytest.raises(AppError, match=r"^Pick a rank from 1 to 2\."):
            client.predict(number, api_name="/highlight_caption")
    with open(log) as console:
        console.seek(start)
        written = console.read()
    assert "Traceback" not in written, written
    assert written.count("refused: ") == 7


# Finding 6: the pixel limits name what the app's user can do.

@pytest.mark.parametrize("size,pixels", [((9000, 5000), "9000x5000 = 45,000,000 pixels"),
                                         ((20000, 10000), "more than")])
def test_too_many_pixels_tell_the_user_to_resize(served_app, tmp_path, size, pixels):
    client = served_app[0]
    huge = tmp_path / "huge.png"
    Image.new("1", size).save(huge)  # a few kB: the limit is checked before decoding
    with pytest.raises(AppError) as refused:
        rank(client, handle_file(str(huge)), "a cat", scoring=None)
    message = str(refused.value)
    assert message.startswith(f"huge.png: {pixels}"), message
    assert "exceeds the app's limit of 40 megapixels; resize it" in message, message
    assert "max_pixels" not in message and "decompression bomb" not in message


# Finding 7: a test run, failed or not, leaves nothing in the temporary folder.

def test_a_failing_test_run_leaves_nothing_in_tmp(tmp_path):
    (tmp_path / "test_leaves.py").write_text(
        "import subprocess, sys, tempfile\n"
        "from pathlib import Path\n"
        "from gradio.utils import get_upload_folder\n\n"
        "def test_writes_and_fails(tmp_path):\n"
        "    tempfile.mkdtemp()\n"
        "    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)\n"
        "    (Path(get_upload_folder()) / 'upload.png').write_bytes(b'x')\n"
        "    subprocess.run([sys.executable, '-c', 'import tempfile; tempfile.mkdtemp()'], check=True)\n"
        "    assert False\n")
    base = tmp_path / "tmp"
    base.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("GRADIO_TEMP_DIR", "PYTEST_ADDOPTS")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_leaves.py")], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "TMPDIR": str(base), "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"})
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout + run.stderr
    assert not list(base.iterdir())
