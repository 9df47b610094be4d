"""Shared test set-up, and the helpers more than one test module uses."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

# OpenMP threads that spin while waiting make torch several times slower when the cores are shared
# (measured: region tests 209 s instead of 55 s on a busy 2-core machine). Must be set before torch
# loads, which is why it lives here, the first module pytest imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# All that the tests, the apps they launch and every child process write to the temporary folder
# (Gradio's uploads, their 40-hex folders and gradio_client's downloads, torchrun's torchelastic_*
# folders, pytest's tmp_path) goes to a folder of this session, removed at its end, on failure too.
# Set before Gradio loads: it reads GRADIO_TEMP_DIR on import.
SESSION_TMP = Path(tempfile.mkdtemp(prefix="adapt-tests-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(SESSION_TMP)
os.environ["GRADIO_TEMP_DIR"] = str(SESSION_TMP / "gradio")

import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402

from training.synthetic import concept_images, concept_prototypes  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def concept_data(n_images: int, n_concepts: int = 12, dim: int = 32, n_regions: int = 8,
                 seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images ``(n_images, n_regions, dim)`` whose regions are noisy prototypes of 3 concepts, and per
    image a caption naming the concepts ("thing3 thing7 thing0"); see :mod:`training.synthetic`."""
    images = concept_images(n_images, concept_prototypes(n_concepts, dim), n_regions, seed)
    return torch.from_numpy(images.features), images.captions


# ---- the launched app (tests/test_app*.py) ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CAT = str(ROOT / "examples" / "cat.jpg")
ENSEMBLE = "Ensemble (mean of both)"


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_process(env: dict[str, str], timeout: float = 300, stop: signal.Signals = signal.SIGINT,
                log: Path | None = None) -> Iterator[Client]:
    """``python app.py`` (the README's command) started in a process of its own with ``env`` added to
    this one's, and a gradio_client of it once it listens. The app is stopped on leaving, on failure too:
    with ``stop`` first (Ctrl-C by default; the app cleans up), then killed if it has not exited within
    60 s. Its console output goes to the file ``log`` (default: a temporary file), never to a pipe
    nobody reads (a full pipe would block the app)."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        console = stack.enter_context(open(log, "w+") if log else tempfile.TemporaryFile("w+"))
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                                  env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env},
                                  stdout=subprocess.DEVNULL, stderr=console, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    console.seek(0)
                    raise AssertionError(f"the app exited with status {server.returncode}:\n{console.read()[-3000:]}")
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                    break
                except Exception:  # not listening yet
                    assert time.monotonic() < deadline, "the app did not start"
                    time.sleep(1)
            yield client
        finally:
            server.send_signal(stop)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def rank(client, image, captions: str, scoring: str = ENSEMBLE, boxes: bool = False):
    """The app's /rank_captions answer through a gradio_client ``client``."""
    return client.predict(image, captions, scoring, boxes, api_name="/rank_captions")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small untrained checkpoint on the default extractor (the app's wiring is under test)."""
    import app
    from adapt import AdaptConfig, AdaptModel, build_vocab
    from adapt.regions import build_extractor

    folder = tmp_path_factory.mktemp("checkpoint")
    extractor = build_extractor()
    config = AdaptConfig(region_dim=extractor.feature_dim, latent_size=32, similarity="ensemble",
                         word_vectors="random", word_dim=16, vocab=build_vocab(app.EXAMPLE_CAPTIONS.splitlines()),
                         extractor=extractor.identity)
    AdaptModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """The app on ``checkpoint``, launched in this process: its URL, retriever, Blocks and logic."""
    import app
    from adapt.pipeline import Retriever

    retriever = Retriever.from_pretrained(checkpoint, cache_dir=tmp_path_factory.mktemp("cache"))
    logic = app.Demo(retriever)
    demo = app.build_demo(logic, str(checkpoint))
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, show_error=True, max_file_size=app.MAX_FILE_SIZE,
                            server_port=None)
    yield url, retriever, demo, logic
    demo.close()


@pytest.fixture
def client(served):
    """A gradio_client client of the served app."""
    from gradio_client import Client

    return Client(served[0], verbose=False)
