"""The app's logic, one method per UI action (:class:`Demo`), and the checks and messages that
keep every user input from reaching the library unchecked: a bad input is refused with a message in
the page, never a traceback. :mod:`app` wires it to Gradio components."""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio
import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image
from starlette.responses import PlainTextResponse

from adapt.gallery import MemoryGallery, SearchHit
from adapt.io import delete_oldest
from adapt.model import AdaptModel
from adapt.pipeline import RankedCaptions, Retriever, hit_image
from adapt.regions import ImageError, load_image
from adapt.regions.base import WORKING_MAX_SIDE
from adapt.regions.image import ImageTooLarge, shrink_to_max_side
from adapt.search import GalleryIndex, GalleryIndexError
from adapt.visualize import draw_hit, draw_ranked, seen_concepts

logger = logging.getLogger("adapt.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
MAX_CAPTIONS = 1000
MAX_CAPTION_CHARS = 1000
# The work of one ranking grows with its captions' total length (the text encoder reads every
# token), not with their number: 20,000 characters are about 4,500 MiniLM tokens (README: cost).
MAX_TOTAL_CHARS = 20_000
# Rankings over this many characters are "long": at most LONG_AT_ONCE of them run at once, and
# the /rank_captions event has SHORT_AT_ONCE more slots, so short rankings never wait behind long ones.
SHORT_CHARS = 2_000
LONG_AT_ONCE = 2
SHORT_AT_ONCE = 2
MAX_GALLERY = 2000
MAX_RESULTS = 50  # of a gallery search
# One add is at most about a minute of extraction on 2 cores, so other users' adds wait no longer.
MAX_FILES_PER_ADD = 200
# What is decoded: 40 Mpx (a 7300 x 5500 photo) is 120 MB of RGB, so two requests at once stay
# under a gigabyte with the decoder's own buffers. JPEGs are decoded at a reduced scale first
# (adapt.regions.load_image's max_side), so a larger camera JPEG still fits.
MAX_PIXELS = 40_000_000
# Drawings handed to Gradio are kept until this many newer ones exist (each served once).
KEEP_DRAWINGS = 1000
DRAWING_MAX_SIDE = 1024
RESULT_MAX_SIDE = 640  # the drawings of the results grid
SCORING = {"ADAPT-T2I (text adapts regions)": ("t2i",), "ADAPT-I2T (image adapts words)": ("i2t",),
           "Ensemble (mean of both)": ("t2i", "i2t"), "Baseline without ADAPT (mean-pooled)": ("mean",)}
KERNELS_MESSAGE = ("The fast CPU kernels are being compiled on this machine (about a minute, once); "
                   "this first search waits for them.")


def refuse(message: str) -> gr.Error:
    """A user-input error: shown in the page, logged as one console line instead of a traceback."""
    logger.warning("refused: %s", message)
    return gr.Error(message, print_exception=False)


def is_whole_number(value: object, low: int, high: int) -> bool:
    """Whether ``value`` (as an API client sent it) is a whole number from ``low`` to ``high``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
            and low <= value <= high)


def parse_captions(text: str | None) -> list[str]:
    """Non-empty lines of ``text``; raises :class:`gr.Error` with what to fix."""
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not captions:
        raise refuse("Type at least one caption, one per line.")
    if len(captions) > MAX_CAPTIONS:
        raise refuse(f"{len(captions)} captions: at most {MAX_CAPTIONS} at a time, please.")
    too_long = [i + 1 for i, c in enumerate(captions) if len(c) > MAX_CAPTION_CHARS]
    if too_long:
        raise refuse(f"Caption {too_long[0]} is longer than {MAX_CAPTION_CHARS} characters; "
                     "shorten it (a caption is a sentence or two).")
    total = sum(map(len, captions))
    if total > MAX_TOTAL_CHARS:
        raise refuse(f"The captions hold {total:,} characters: at most {MAX_TOTAL_CHARS:,} at a time, "
                     "please; rank them in parts.")
    return captions


def image_problem(error: ImageError) -> str:
    """What the app tells its user about an image it cannot use: for one with too many pixels, the
    size to resize it to (the library's own advice, to raise ``max_pixels``, is not the user's to take)."""
    if not isinstance(error, ImageTooLarge):
        return str(error)
    limit = f"{error.max_pixels / 1e6:g} megapixels"
    if error.size is None:
        return f"{error.name}: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels exceeds the app's limit of {limit}; " \
               f"resize it below {limit} and upload it again."
    width, height = error.size
    scale = (error.max_pixels / (width * height)) ** 0.5
    return (f"{error.name}: {width}x{height} = {width * height:,} pixels exceeds the app's limit of {limit}; "
            f"resize it to {int(width * scale)}x{int(height * scale)} or smaller and upload it again.")


def warn_unknown_words(model: AdaptModel, captions: list[str]) -> None:
    """Warn (in the page) when the model knows none of a caption's words: its score means little."""
    unknown = [i + 1 for i in model.text_encoder.unknown_word_captions(captions)]
    if unknown:
        which = f"caption {unknown[0]}" if len(unknown) == 1 else f"captions {', '.join(map(str, unknown[:10]))}"
        gr.Warning(f"The model knows none of the words of {which}; "
                   f"{'its score means' if len(unknown) == 1 else 'their scores mean'} little.")


class DrawingFiles:
    """Drawings handed to Gradio, each written once to a file of its own.

    Gradio caches a returned PIL image under a hash of its bytes and rewrites that file on every
    request, so identical concurrent requests overwrite a file another one is still downloading
    ("Too little data for declared Content-Length"). A file per drawing is never rewritten; the
    oldest are deleted once ``keep`` newer ones exist.
    """

    def __init__(self, folder: Path, keep: int = KEEP_DRAWINGS) -> None:
        self.folder = folder
        self.keep = keep
        self._written: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def save(self, image: Image.Image) -> str:
        """Write ``image`` as a JPEG file nobody else writes; returns its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.folder, prefix="drawing-", suffix=".jpg")
        with os.fdopen(fd, "wb") as file:
            image.save(file, "JPEG", quality=90)
        with self._lock:
            self._written.append(path)
            while len(self._written) > self.keep:
                Path(self._written.popleft()).unlink(missing_ok=True)
        return path


def prune_oldest(folder: Path, max_bytes: int, keep: frozenset[str] = frozenset()) -> None:
    """Delete the oldest files under ``folder`` (:func:`~adapt.io.delete_oldest`; never those in
    ``keep``) until they take at most ``max_bytes``; a folder emptied so (an upload's own) goes too."""
    every = (os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    for path in delete_oldest(every, max_bytes, keep):
        with contextlib.suppress(OSError):  # not empty: other files still live there
            os.rmdir(os.path.dirname(path))


class BoundedUploads:
    """ASGI middleware that keeps Gradio's upload folder within ``max_bytes``.

    Anyone may send files to ``/gradio_api/upload`` without calling the app, and Gradio keeps them
    for a day. Each upload must say its size (Content-Length) and fit the bound; room is made for it
    beforehand by deleting the oldest files (``keep``: the example photos' copies, never deleted), so
    a flood pushes out its own files first. Drawings live in the same folder and count too.
    """

    def __init__(self, app: Any, folder: Path, max_bytes: int, keep: frozenset[str] = frozenset()) -> None:
        self.app, self.folder, self.max_bytes, self.keep = app, folder, max_bytes, keep

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/gradio_api/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return await PlainTextResponse("Send uploads with their size (Content-Length).", 411)(scope, receive, send)
        if int(length) > self.max_bytes:
            refusal = f"Upload at most {self.max_bytes // 2**20} MB at a time, please."
            return await PlainTextResponse(refusal, 413)(scope, receive, send)
        await anyio.to_thread.run_sync(prune_oldest, self.folder, self.max_bytes - int(length), self.keep)
        await self.app(scope, receive, send)
        # Concurrent uploads may each have made room for themselves only.
        await anyio.to_thread.run_sync(prune_oldest, self.folder, self.max_bytes, self.keep)


def open_gallery(folder: str, model: AdaptModel) -> tuple[GalleryIndex | None, str | None]:
    """The index in ``folder`` opened for ``model``, or ``None`` and why it cannot be served (an
    index of another model names the difference)."""
    try:
        return GalleryIndex.open(folder, model), None
    except GalleryIndexError as e:
        return None, f"The gallery {Path(folder).name} is not served: {e}"


class SessionState(dict):
    """A session's search state: its uploads' ``"gallery"`` (a :class:`MemoryGallery`), each key's
    file ``"names"`` and the ``"hits"`` of its last search.

    Gradio deep-copies a ``gr.State``'s starting value for every session; the copy shares the
    model (read-only here, and searches check they are given the retriever's own) instead of
    copying its weights.
    """

    def __deepcopy__(self, memo: dict) -> "SessionState":
        model = self["gallery"].model
        memo[id(model)] = model
        return SessionState({key: copy.deepcopy(value, memo) for key, value in self.items()})


def rank_pickers(show: Callable[[dict, int], tuple], items: Callable[[dict], list], first: str,
                 what: str) -> tuple[Callable, Callable]:
    """The two handlers that show one item of a session's last ranked list with ``show(state, row)``:
    by its rank (1 = best; the API's) and by a click on it (``gr.SelectData``, which API clients
    cannot send). Without a list they ask the user to make one (``first``); a rank out of range is
    refused naming the range ("Pick ``what`` from 1 to n.")."""

    def at_rank(rank: float | None, state: dict | None) -> tuple:
        n = len(items(state)) if state else 0
        if not n:
            raise refuse(first)
        if not is_whole_number(rank, 1, n):
            raise refuse(f"Pick {what} from 1 to {n}.")
        return show(state, int(rank) - 1)

    def clicked(state: dict | None, evt: gr.SelectData) -> tuple:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        return (row + 1, *at_rank(row + 1, state))

    return at_rank, clicked


class Demo:
    """The app's logic, one method per UI action; each session's data lives in its ``gr.State``.

    Args:
        retriever: the model and its region extractor.
        drawings: where drawings are written for Gradio to serve (default: a folder in Gradio's
            upload folder, so they are served and deleted with the uploads).
        kernels_building: whether the fused CPU kernels are still being built (a search waits).
        served: a gallery index every session searches besides its own uploads (opened with the
            retriever's model); without one, sessions start with the example photos.
        served_problem: why a gallery asked for is not served (shown in the Search tab).
    """

    def __init__(self, retriever: Retriever, drawings: DrawingFiles | None = None,
                 kernels_building: Callable[[], bool] = lambda: False,
                 served: GalleryIndex | None = None, served_problem: str | None = None) -> None:
        self.retriever = retriever
        self.drawings = drawings or DrawingFiles(Path(get_upload_folder()) / "adapt-drawings")
        self.kernels_building = kernels_building
        self.served = served
        self.served_problem = served_problem
        self._served_lock = threading.Lock()  # an embedded Qdrant collection is not for concurrent use
        self._long_lanes = threading.BoundedSemaphore(LONG_AT_ONCE)
        self.max_pixels = min(MAX_PIXELS, retriever.extractor.max_pixels)
        self.choices = [name for name, dirs in SCORING.items()
                        if set(dirs) <= set(retriever.directions)]
        self.own_choice = next(name for name, dirs in SCORING.items()
                               if set(dirs) == set(retriever.model.config.directions))
        # (rank, state) -> the drawing and its caption or description; (state, click) -> also the rank.
        self.highlight_caption, self.select_caption = rank_pickers(
            self._highlight, lambda state: state["ranked"].captions, "Rank some captions first.", "a rank")
        self.highlight_hit, self.select_hit = rank_pickers(
            self._show_hit, lambda state: state.get("hits") or [], "Search the gallery first.", "a match")
        self.start_state = self.empty_state()
        if served is None:
            for problem in self._add_files(self.start_state, [str(p) for p in EXAMPLES]):
                logger.warning("example left out: %s", problem)

    def _load(self, path: str | None) -> tuple[Image.Image, str]:
        """Decode an uploaded file once; errors name the user's file, never the server's path."""
        if not path:
            raise refuse("Upload an image first, or pick one of the examples.")
        name = Path(path).name  # Gradio keeps the uploaded file's own name, in a folder of its own
        try:
            return load_image(path, self.max_pixels, max_side=WORKING_MAX_SIDE, name=name), name
        except ImageError as e:
            raise refuse(image_problem(e)) from e

    def rank(self, image_path: str | None, captions_text: str, scoring: str | None, show_boxes: bool):
        """Rank the captions for the image: the table, the highlight of the best, its caption,
        the detected regions, the highlighted rank (1), what the model sees in the image (concept
        -> score, :func:`~adapt.visualize.seen_concepts`) and the session's state."""
        captions = parse_captions(captions_text)
        image, name = self._load(image_path)
        with self._lane(captions):
            warn_unknown_words(self.retriever.model, captions)
            _, regions = self.retriever.regions(image)
            ranked = self.retriever.rank_captions(regions, captions, SCORING.get(scoring or ""))
        table = [[i + 1, c, round(float(s), 4)] for i, (c, s) in enumerate(zip(ranked.captions, ranked.scores))]
        state = {"image": shrink_to_max_side(image, DRAWING_MAX_SIDE), "ranked": ranked, "show_boxes": show_boxes}
        seen = dict(seen_concepts(regions, self.retriever.extractor.scene_probabilities(regions)))
        return (table, *self._highlight(state, 0), self._boxes_table(ranked), 1, seen, state)

    @contextlib.contextmanager
    def _lane(self, captions: list[str]) -> Iterator[None]:
        """Hold one of the LONG_AT_ONCE lanes while ranking long ``captions`` (refused when all are
        busy, so that long rankings never hold the slots short ones need)."""
        if sum(map(len, captions)) <= SHORT_CHARS:
            yield
            return
        if not self._long_lanes.acquire(blocking=False):
            raise refuse(f"{LONG_AT_ONCE} long caption lists are being ranked right now; try again in a few "
                         f"seconds, or send at most {SHORT_CHARS:,} characters of captions.")
        try:
            yield
        finally:
            self._long_lanes.release()

    def _highlight(self, state: dict, row: int) -> tuple[str, str]:
        """The drawing of ranked caption ``row`` (its file) and that caption, as plain text."""
        drawing = draw_ranked(state["image"], state["ranked"], row, state["show_boxes"], DRAWING_MAX_SIDE)
        return self.drawings.save(drawing), state["ranked"].captions[row]

    @staticmethod
    def _boxes_table(ranked: RankedCaptions) -> list[list]:
        r = ranked.regions
        return [[i + 1, label or "(fill)", round(float(score), 3), str([round(float(v)) for v in box])]
                for i, (label, score, box) in enumerate(zip(r.labels, r.scores, r.boxes))]

    def empty_state(self) -> SessionState:
        """A session's state with no uploads (see :class:`SessionState`)."""
        return SessionState(gallery=MemoryGallery(self.retriever.model), names={}, hits=[])

    def _add_files(self, state: dict, files: list[str], progress: gr.Progress | None = None) -> list[str]:
        """Add image files to a session's gallery; returns the problems of those left out."""
        gallery, problems = state["gallery"], []
        # One file at a time and lazily: once the gallery is full, no further file is extracted.
        read = self.retriever.extract_files(files, max_pixels=self.max_pixels, max_side=WORKING_MAX_SIDE, batch_size=1)
        for done in range(len(files)):
            if progress is not None:
                progress((done, len(files)), desc="Adding images to the gallery", unit="images")
            if len(gallery) >= MAX_GALLERY:
                problems.append(f"the gallery holds at most {MAX_GALLERY} images; the rest were not added")
                break
            file = next(read)
            if file.problem is not None:
                problems.append(refuse(image_problem(file.problem)).message)
                continue
            gallery.add(file.key, file.regions, source=file.path)
            state["names"][file.key] = file.name
        return problems

    def add_images(self, files: list[str] | None, state: dict, progress: gr.Progress = gr.Progress()):
        """Add uploaded images to the session's gallery (bad files are reported and skipped);
        returns the state, the gallery's status and the emptied upload box."""
        if not files:
            raise refuse("Choose one or more image files to add.")
        if len(files) > MAX_FILES_PER_ADD:
            raise refuse(f"{len(files)} files: add at most {MAX_FILES_PER_ADD} at a time, please.")
        # Gradio gives every session its own deep copy of the State, so it is changed in place.
        problems = self._add_files(state, files, progress)
        for problem in problems[:5]:
            gr.Warning(problem)
        if len(problems) > 5:
            gr.Warning(f"... and {len(problems) - 5} more files were not added.")
        return state, self.gallery_status(state), None

    def clear_gallery(self, state: dict):
        """An empty gallery of uploads: the state, its status and no results."""
        state = self.empty_state()
        return state, self.gallery_status(state), []

    def gallery_status(self, state: dict) -> str:
        """What the session searches: the served gallery (or why there is none) and its uploads."""
        n = len(state["gallery"])
        uploads = f"**{n} image{'s' if n != 1 else ''}** of yours"
        if self.served is not None:
            served = f"The served gallery holds **{len(self.served):,} images**"
            return f"{served}; searched together with {uploads}." if n else f"{served}; add images to search yours too."
        problem = f"{self.served_problem}\n\n" if self.served_problem else ""
        return problem + (f"{uploads} in the gallery." if n else "The gallery is empty: add images to search them.")

    def _galleries(self, state: dict) -> list:
        return [g for g in (self.served, state["gallery"]) if g is not None and len(g)]

    def search(self, query: str, top_k: float, state: dict) -> tuple[list[tuple[str, str]], str, str | None, str, dict]:
        """Search the served gallery and the session's uploads with a caption: the best matches
        (drawing file, score) with their attended regions lit, how many images were searched,
        the drawing and description of the best match, and the state (which keeps the hits)."""
        query = (query or "").strip()
        if not query:
            raise refuse("Type a caption to search for.")
        if len(query) > MAX_CAPTION_CHARS:
            raise refuse(f"The query is longer than {MAX_CAPTION_CHARS} characters; shorten it.")
        if not is_whole_number(top_k, 1, MAX_RESULTS):
            raise refuse(f"Ask for 1 to {MAX_RESULTS} results.")
        galleries = self._galleries(state)
        if not galleries:
            raise refuse("The gallery is empty: add images first (or reload the page for the samples).")
        warn_unknown_words(self.retriever.model, [query])
        if self.kernels_building():
            gr.Info(KERNELS_MESSAGE)
        with self._served_lock:
            found = self.retriever.search(galleries, query, top_k=int(top_k))
        hits, images = [], []
        for hit in found:
            image = self._hit_image(hit, state)
            if image is None:
                continue
            drawing = draw_hit(image, hit, self._name(hit, state), len(hits) + 1, RESULT_MAX_SIDE)[0]
            images.append((self.drawings.save(drawing), f"{hit.score:.3f}"))
            hits.append(hit)
        state["hits"] = hits
        searched = sum(len(g) for g in galleries)
        status = (f"Searched **{searched:,} image{'s' if searched != 1 else ''}**"
                  + (f" ({len(self.served):,} served, {len(state['gallery'])} of yours)." if self.served else "."))
        drawing, description = self._show_hit(state, 0) if hits else (None, "No match could be shown.")
        return images, status, drawing, description, state

    @staticmethod
    def _name(hit: SearchHit, state: dict) -> str:
        """What the user calls a hit: an upload's file name, a served image's id."""
        return state["names"].get(hit.key, hit.key)

    def _hit_image(self, hit: SearchHit, state: dict) -> Image.Image | None:
        """The picture of a hit, or ``None`` (with a warning) when its file is gone."""
        name = self._name(hit, state)
        image = hit_image(hit, self.max_pixels, name)
        if image is None:
            where = "uploads are kept for a day; add it again" if hit.key in state["names"] else "rebuild the gallery"
            gr.Warning(f"{name} is no longer on the server ({where} to see it).")
        return image

    def _show_hit(self, state: dict, row: int) -> tuple[str | None, str]:
        """The drawing of hit ``row`` of the session's last search and what it is."""
        hit: SearchHit = state["hits"][row]
        image = self._hit_image(hit, state)
        if image is None:
            return None, ""
        drawing, description = draw_hit(image, hit, self._name(hit, state), row + 1, DRAWING_MAX_SIDE)
        return self.drawings.save(drawing), description
