"""ADAPT image-text retrieval demo: rank captions for an image, search a gallery by caption.

    python app.py                                  # the bundled default model, offline
    python app.py --checkpoint user/adapt-model    # a Hub repo id or a local folder
    ADAPT_CHECKPOINT=path python app.py
    python app.py --gallery INDEX                  # also search a gallery built by training.index
    ADAPT_GALLERY=INDEX python app.py              # the same, e.g. in a Space's settings

The UI only wires Gradio components to :mod:`adapt.pipeline` and the galleries of
:mod:`adapt.gallery`; every input is checked here and refused with a message in the page, never a
traceback.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np
import torch
from gradio.data_classes import ImageData
from gradio.processing_utils import save_base64_to_cache
from gradio.utils import get_upload_folder
from PIL import Image

from adapt import fused
from adapt.encoders import UNK
from adapt.model import AdaptModel, CheckpointError
from adapt.gallery import MemoryGallery, SearchHit, search_galleries
from adapt.pipeline import DEFAULT_CHECKPOINT, RankedCaptions, Retriever
from adapt.regions import ImageError, Regions, load_image
from adapt.regions.base import WORKING_MAX_SIDE
from adapt.search import GalleryIndex, GalleryIndexError
from adapt.visualize import draw_attention, looked_at

logger = logging.getLogger("adapt.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
CACHE_DIR = Path(os.environ.get("ADAPT_CACHE_DIR", ROOT / ".cache" / "regions"))
# About 5000 images' regions; the least recently used are deleted beyond it.
CACHE_MAX_BYTES = int(os.environ.get("ADAPT_CACHE_MAX_MB", 1024)) * 2**20
MAX_CAPTIONS = 1000
MAX_CAPTION_CHARS = 1000
MAX_GALLERY = 2000
# One add is at most about a minute of extraction on 2 cores, so other users' adds wait no longer.
MAX_FILES_PER_ADD = 200
MAX_FILE_SIZE = "25mb"
# What is decoded: 40 Mpx (a 7300 x 5500 photo) is 120 MB of RGB, so two requests at once stay
# under a gigabyte with the decoder's own buffers. JPEGs are decoded at a reduced scale first
# (adapt.regions.load_image's max_side), so a larger camera JPEG still fits.
MAX_PIXELS = 40_000_000
# Uploads and drawings in Gradio's cache older than a day are deleted, checked every hour.
DELETE_CACHE = (3600, 86400)
# Drawings handed to Gradio are kept until this many newer ones exist (each served once).
KEEP_DRAWINGS = 1000
DRAWING_MAX_SIDE = 1024
RESULT_MAX_SIDE = 640  # the drawings of the results grid
EXAMPLE_CAPTIONS = "\n".join([
    "A group of people observing two planes at an air show.",
    "A large white dog is sitting on a bench beside an elderly man.",
    "A woman in a space suit smiling in front of a flag.",
    "A cat lying on a purple blanket.",
    "A cup of coffee on a saucer on a wooden table.",
    "A rocket lifting off from a launch pad.",
    "An officer in a navy uniform posing for a portrait.",
])
SCORING = {"ADAPT-T2I (text adapts regions)": ("t2i",), "ADAPT-I2T (image adapts words)": ("i2t",),
           "Ensemble (mean of both)": ("t2i", "i2t"), "Baseline without ADAPT (mean-pooled)": ("mean",)}
KERNELS_MESSAGE = ("The fast CPU kernels are being compiled on this machine (about a minute, once); "
                   "this first search waits for them.")


def refuse(message: str) -> gr.Error:
    """A user-input error: shown in the page, logged as one console line instead of a traceback."""
    logger.warning("refused: %s", message)
    return gr.Error(message, print_exception=False)


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
    return captions


def unreadable_captions(model: AdaptModel, captions: list[str]) -> list[int]:
    """Numbers (from 1) of the captions in which the text encoder knows no word.

    A word-vector encoder knows a word when it is in its vocabulary; a WordPiece transformer when
    any of the caption's word pieces (special tokens aside) is not ``[UNK]``. Encoders with no
    unknown token (byte-level BPE) read everything.
    """
    encoder = model.text_encoder
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None:
        unknown_id = tokenizer.unk_token_id
        special = sorted(set(tokenizer.all_special_ids) - {unknown_id})
    else:
        unknown_id, special = getattr(encoder, "index", {}).get(UNK), []
    if unknown_id is None:
        return []
    batch = model.tokenize(captions)
    words = batch.mask & ~torch.isin(batch.ids, torch.tensor(special, dtype=batch.ids.dtype))
    unknown = batch.ids == unknown_id
    return [i + 1 for i in range(len(captions)) if bool(unknown[i][words[i]].all())]


def warn_unknown_words(model: AdaptModel, captions: list[str]) -> None:
    """Warn (in the page) when the model knows none of a caption's words: its score means little."""
    unknown = unreadable_captions(model, captions)
    if unknown:
        which = f"caption {unknown[0]}" if len(unknown) == 1 else f"captions {', '.join(map(str, unknown[:10]))}"
        gr.Warning(f"The model knows none of the words of {which}; "
                   f"{'its score means' if len(unknown) == 1 else 'their scores mean'} little.")


def image_upload(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` whose upload reaches the app as its file path, undecoded.

    ``gr.Image`` opens every upload with PIL before the app sees it (so a broken file gets Gradio's
    internal error, and 16-bit images are clipped); here the browser shows the preview and the app
    decodes the file once, with :func:`adapt.regions.load_image`. (The instance's ``preprocess`` is
    replaced rather than subclassed: Gradio writes a ``.pyi`` stub beside every module that
    defines a component class.)
    """
    component = gr.Image(type="filepath", **kwargs)

    def upload_path(payload: ImageData | None) -> str | None:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # a pasted image: written to a file first
            return save_base64_to_cache(payload.url, component.GRADIO_CACHE, payload.orig_name or "pasted.png")
        return payload.path

    component.preprocess = upload_path
    return component


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


def regions_in(regions: Regions, size: tuple[int, int]) -> Regions:
    """``regions`` with their boxes in the pixels of the same picture at ``size`` (a thumbnail)."""
    if tuple(size) == tuple(regions.image_size):
        return regions
    scale = np.array([size[0] / regions.image_size[0], size[1] / regions.image_size[1]] * 2, dtype=np.float32)
    return dataclasses.replace(regions, boxes=regions.boxes * scale, image_size=tuple(size))


def shrink_for_drawing(image: Image.Image, regions: Regions, max_side: int) -> tuple[Image.Image, Regions]:
    """The image downscaled to at most ``max_side`` and its regions' boxes in those pixels."""
    scale = min(1.0, max_side / max(image.size))
    small = image if scale == 1.0 else image.resize((max(1, round(image.width * scale)),
                                                     max(1, round(image.height * scale))))
    return small, regions_in(regions, small.size)


def open_gallery(folder: str, model: AdaptModel) -> tuple[GalleryIndex | None, str | None]:
    """The index in ``folder`` opened for ``model``, or ``None`` and why it cannot be served (an
    index of another model names the difference)."""
    try:
        return GalleryIndex.open(folder, model), None
    except GalleryIndexError as e:
        return None, f"The gallery {Path(folder).name} is not served: {e}"


class Demo:
    """The app's logic, one method per UI action; each session's data lives in its ``gr.State``.

    Args:
        retriever: the model and its region extractor.
        drawings: where drawings are written for Gradio to serve.
        kernels_building: whether the fused CPU kernels are still being built (a search waits).
        served: a gallery index every session searches besides its own uploads (opened with the
            retriever's model); without one, sessions start with the example photos.
        served_problem: why a gallery asked for is not served (shown in the Search tab).
    """

    def __init__(self, retriever: Retriever, drawings: DrawingFiles,
                 kernels_building: Callable[[], bool] = lambda: False,
                 served: GalleryIndex | None = None, served_problem: str | None = None) -> None:
        self.retriever = retriever
        self.drawings = drawings
        self.kernels_building = kernels_building
        self.served = served
        self.served_problem = served_problem
        self._served_lock = threading.Lock()  # an embedded Qdrant collection is not for concurrent use
        self.max_pixels = min(MAX_PIXELS, retriever.extractor.max_pixels)
        self.choices = [name for name, dirs in SCORING.items()
                        if set(dirs) <= set(retriever.directions)]
        self.own_choice = next(name for name, dirs in SCORING.items()
                               if set(dirs) == set(retriever.model.config.directions))
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
            raise refuse(str(e)) from e

    def rank(self, image_path: str | None, captions_text: str, scoring: str | None, show_boxes: bool):
        """Rank the captions for the image: the table, the highlight of the best, its caption,
        the detected regions, the highlighted rank (1) and the session's state."""
        captions = parse_captions(captions_text)
        image, name = self._load(image_path)
        warn_unknown_words(self.retriever.model, captions)
        _, regions = self.retriever.regions(image)
        ranked = self.retriever.rank_captions(regions, captions, SCORING.get(scoring or ""))
        table = [[i + 1, c, round(float(s), 4)] for i, (c, s) in enumerate(zip(ranked.captions, ranked.scores))]
        small, small_regions = shrink_for_drawing(image, regions, DRAWING_MAX_SIDE)
        state = {"image": small, "regions": small_regions, "ranked": ranked, "show_boxes": show_boxes}
        return (table, *self._highlight(state, 0), self._boxes_table(ranked), 1, state)

    def _highlight(self, state: dict, row: int) -> tuple[str, str]:
        """The drawing of ranked caption ``row`` (its file) and that caption, as plain text."""
        ranked: RankedCaptions = state["ranked"]
        weights = None if ranked.region_weights is None else ranked.region_weights[row]
        drawing = draw_attention(state["image"], state["regions"], weights, all_boxes=state["show_boxes"],
                                 max_side=DRAWING_MAX_SIDE)
        return self.drawings.save(drawing), ranked.captions[row]

    @staticmethod
    def _boxes_table(ranked: RankedCaptions) -> list[list]:
        r = ranked.regions
        return [[i + 1, label or "(fill)", round(float(score), 3), str([round(float(v)) for v in box])]
                for i, (label, score, box) in enumerate(zip(r.labels, r.scores, r.boxes))]

    def highlight_caption(self, rank: float | None, state: dict | None) -> tuple[str, str]:
        """The highlight of the caption ranked ``rank`` (1 = best) in the session's last ranking."""
        if not state:
            raise refuse("Rank some captions first.")
        n = len(state["ranked"].captions)
        if rank is None or not float(rank).is_integer() or not 1 <= rank <= n:
            raise refuse(f"Pick a rank from 1 to {n}.")
        return self._highlight(state, int(rank) - 1)

    def select_caption(self, state: dict | None, evt: gr.SelectData) -> tuple[int, str, str]:
        """Switch the highlight to the clicked ranked caption; returns its rank, drawing and caption."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        return (row + 1, *self.highlight_caption(row + 1, state))

    def empty_state(self) -> dict:
        """A session's state: its uploads' :class:`MemoryGallery`, each key's file name, and the
        hits of its last search."""
        return {"gallery": MemoryGallery(self.retriever.model), "names": {}, "hits": []}

    def _add_files(self, state: dict, files: list[str], progress: gr.Progress | None = None) -> list[str]:
        """Add image files to a session's gallery; returns the problems of those left out."""
        gallery, problems = state["gallery"], []
        for done, path in enumerate(files):
            if progress is not None:
                progress((done, len(files)), desc="Adding images to the gallery", unit="images")
            if len(gallery) >= MAX_GALLERY:
                problems.append(f"the gallery holds at most {MAX_GALLERY} images; the rest were not added")
                break
            try:
                image, name = self._load(path)
            except gr.Error as e:
                problems.append(e.message)
                continue
            key, regions = self.retriever.regions(image)
            gallery.add(key, regions, source=path)
            state["names"][key] = name
        return problems

    def add_images(self, files: list[str] | None, state: dict, progress: gr.Progress = gr.Progress()):
        """Add uploaded images to the session's gallery (bad files are reported and skipped);
        returns the state, the gallery's status and the emptied upload box."""
        if not files:
            raise refuse("Choose one or more image files to add.")
        if len(files) > MAX_FILES_PER_ADD:
            raise refuse(f"{len(files)} files: add at most {MAX_FILES_PER_ADD} at a time, please.")
        # Gradio gives every session its own deep copy of the State, so it is changed in place.
        problems = self._add_files(state, [getattr(f, "name", f) for f in files], progress)
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
        galleries = self._galleries(state)
        if not galleries:
            raise refuse("The gallery is empty: add images first (or reload the page for the samples).")
        warn_unknown_words(self.retriever.model, [query])
        if self.kernels_building():
            gr.Info(KERNELS_MESSAGE)
        with self._served_lock:
            found = search_galleries(galleries, [query], top_k=int(top_k))[0]
        hits, images = [], []
        for hit in found:
            image = self._hit_image(hit, state)
            if image is None:
                continue
            small, regions = shrink_for_drawing(image, regions_in(hit.regions, image.size), RESULT_MAX_SIDE)
            drawing = draw_attention(small, regions, hit.region_weights, max_side=RESULT_MAX_SIDE)
            images.append((self.drawings.save(drawing), f"{hit.score:.3f}"))
            hits.append(hit)
        state["hits"] = hits
        searched = sum(len(g) for g in galleries)
        status = (f"Searched **{searched:,} image{'s' if searched != 1 else ''}**"
                  + (f" ({len(self.served):,} served, {len(state['gallery'])} of yours)." if self.served else "."))
        drawing, description = self._show_hit(state, 0) if hits else (None, "No match could be shown.")
        return images, status, drawing, description, state

    def _hit_image(self, hit: SearchHit, state: dict) -> Image.Image | None:
        """The picture of a hit, or ``None`` (with a warning) when its file is gone."""
        name = state["names"].get(hit.key, hit.key)
        if hit.source is not None:
            try:
                return load_image(hit.source, self.max_pixels, max_side=WORKING_MAX_SIDE, name=name)
            except ImageError:
                pass
        where = "uploads are kept for a day; add it again" if hit.key in state["names"] else "rebuild the gallery"
        gr.Warning(f"{name} is no longer on the server ({where} to see it).")
        return None

    def _show_hit(self, state: dict, row: int) -> tuple[str | None, str]:
        """The drawing of hit ``row`` of the session's last search and what it is."""
        hit: SearchHit = state["hits"][row]
        image = self._hit_image(hit, state)
        if image is None:
            return None, ""
        regions = regions_in(hit.regions, image.size)
        drawing = draw_attention(image, regions, hit.region_weights, max_side=DRAWING_MAX_SIDE)
        looked = "" if hit.region_weights is None else "; looked at " + looked_at(regions, hit.region_weights)
        return self.drawings.save(drawing), f"{row + 1}. {state['names'].get(hit.key, hit.key)} ({hit.score:.3f}){looked}"

    def highlight_hit(self, rank: float | None, state: dict | None) -> tuple[str | None, str]:
        """The drawing and description of the match ranked ``rank`` (1 = best) in the last search."""
        if not state or not state.get("hits"):
            raise refuse("Search the gallery first.")
        n = len(state["hits"])
        if rank is None or not float(rank).is_integer() or not 1 <= rank <= n:
            raise refuse(f"Pick a match from 1 to {n}.")
        return self._show_hit(state, int(rank) - 1)

    def select_hit(self, state: dict | None, evt: gr.SelectData) -> tuple[int, str | None, str]:
        """Show the clicked match: its rank, drawing and description."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        return (row + 1, *self.highlight_hit(row + 1, state))


def model_card(checkpoint: str) -> str:
    """The checkpoint's model card (README.md), or its config when it has none."""
    card = Path(checkpoint) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        return text.split("---", 2)[-1] if text.startswith("---") else text
    return f"Checkpoint `{checkpoint}` has no model card."


def build_demo(retriever: Retriever, checkpoint: str,
               kernels_building: Callable[[], bool] = lambda: False,
               served: GalleryIndex | None = None, served_problem: str | None = None) -> gr.Blocks:
    """The Gradio Blocks UI around a retriever (``kernels_building``, ``served``,
    ``served_problem``: see :class:`Demo`)."""
    demo_logic = Demo(retriever, DrawingFiles(Path(get_upload_folder()) / "adapt-drawings"), kernels_building,
                      served, served_problem)
    with gr.Blocks(title="ADAPT image-text retrieval", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# ADAPT: adaptive cross-modal embeddings\nRank captions for an image, or search "
                    "images with a caption. The highlight shows each region's share of the caption's "
                    "score (Wehrmann et al., AAAI 2020).")
        with gr.Tab("Rank captions"):
            with gr.Row():
                with gr.Column():
                    image = image_upload(label="Image", sources=["upload", "clipboard"], height=360)
                    gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image], label="Example photos",
                                api_visibility="private")
                    captions = gr.Textbox(EXAMPLE_CAPTIONS, lines=8, max_lines=30, label="Captions, one per line")
                    scoring = gr.Radio(demo_logic.choices, value=demo_logic.own_choice, label="Scoring",
                                       visible=len(demo_logic.choices) > 1)
                    show_boxes = gr.Checkbox(False, label="Outline every detected region on the image")
                    rank_button = gr.Button("Rank captions", variant="primary")
                with gr.Column():
                    highlight = gr.Image(label="Attention of the selected caption", type="filepath",
                                         interactive=False, height=360, elem_id="highlight")
                    with gr.Row():
                        highlight_caption = gr.Textbox(label="Highlighted caption", interactive=False, scale=4,
                                                       elem_id="highlighted-caption")
                        highlight_rank = gr.Number(1, label="Rank of the highlighted caption", precision=0,
                                                   minimum=1, scale=1)
                    ranked = gr.Dataframe(headers=["rank", "caption", "score"], datatype=["number", "str", "number"],
                                          label="Ranked captions (click one to see its attention)",
                                          interactive=False, wrap=True, column_widths=["10%", "72%", "18%"],
                                          elem_id="ranked-captions")
                    with gr.Accordion("Detected regions and their labels", open=False):
                        boxes = gr.Dataframe(headers=["region", "label", "detector score", "box (x1, y1, x2, y2)"],
                                             label="Detected regions", interactive=False)
            rank_state = gr.State()
            rank_button.click(demo_logic.rank, [image, captions, scoring, show_boxes],
                              [ranked, highlight, highlight_caption, boxes, highlight_rank, rank_state],
                              api_name="rank_captions")
            highlight_rank.input(demo_logic.highlight_caption, [highlight_rank, rank_state],
                                 [highlight, highlight_caption], api_name="highlight_caption",
                                 trigger_mode="always_last")
            # Clicks carry gr.SelectData, which API clients cannot send: they use /highlight_caption.
            ranked.select(demo_logic.select_caption, [rank_state], [highlight_rank, highlight, highlight_caption],
                          api_name="select_caption", api_visibility="private")
        with gr.Tab("Search gallery"):
            gallery_state = gr.State(demo_logic.start_state)
            with gr.Row():
                query = gr.Textbox(label="Caption", placeholder="a cat lying on a blanket", scale=4)
                top_k = gr.Slider(1, 50, value=8, step=1, label="Results", scale=1)
            search_button = gr.Button("Search", variant="primary")
            search_status = gr.Markdown(label="Images searched", elem_id="search-status")
            with gr.Row():
                results = gr.Gallery(label="Best matches (score), attended regions lit; click one to see it",
                                     columns=4, height="auto", scale=3, elem_id="search-results")
                with gr.Column(scale=2):
                    hit_drawing = gr.Image(label="Where the caption looked in the selected match", type="filepath",
                                           interactive=False, height=360, elem_id="hit-drawing")
                    with gr.Row():
                        hit_caption = gr.Textbox(label="Selected match", interactive=False, scale=4,
                                                 elem_id="hit-caption")
                        hit_rank = gr.Number(1, label="Rank of the selected match", precision=0, minimum=1, scale=1)
            gallery_status = gr.Markdown(demo_logic.gallery_status(gallery_state.value), label="Gallery status",
                                         elem_id="gallery-status")
            with gr.Row():
                uploads = gr.File(file_count="multiple", file_types=["image"], label="Add images to the gallery")
                clear_button = gr.Button("Clear the gallery", variant="stop")
            found = [results, search_status, hit_drawing, hit_caption, gallery_state]
            search_button.click(demo_logic.search, [query, top_k, gallery_state], found, api_name="search_gallery")
            query.submit(demo_logic.search, [query, top_k, gallery_state], found,
                         api_name="search_gallery_on_enter", api_visibility="private")
            hit_rank.input(demo_logic.highlight_hit, [hit_rank, gallery_state], [hit_drawing, hit_caption],
                           api_name="highlight_hit", trigger_mode="always_last")
            # Clicks carry gr.SelectData, which API clients cannot send: they use /highlight_hit.
            results.select(demo_logic.select_hit, [gallery_state], [hit_rank, hit_drawing, hit_caption],
                           api_name="select_hit", api_visibility="private")
            # Extraction is the slow step: one add at a time, beside (not instead of) ranking and search.
            uploads.upload(demo_logic.add_images, [uploads, gallery_state], [gallery_state, gallery_status, uploads],
                           api_name="add_images", concurrency_limit=1, concurrency_id="add_images")
            clear_button.click(demo_logic.clear_gallery, [gallery_state], [gallery_state, gallery_status, results],
                               api_name="clear_gallery")
        with gr.Tab("About"):
            gr.Markdown(model_card(checkpoint))
    return demo


def main(argv: list[str] | None = None) -> None:
    """Load the checkpoint, start building the fused kernels and serve the app."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.environ.get("ADAPT_CHECKPOINT", str(DEFAULT_CHECKPOINT)),
                        help="local folder or Hub repo id (default: $ADAPT_CHECKPOINT or the bundled model)")
    parser.add_argument("--gallery", default=os.environ.get("ADAPT_GALLERY"),
                        help="a gallery index (python -m training.index) to search besides the uploads "
                             "(default: $ADAPT_GALLERY)")
    parser.add_argument("--allow-extractor-mismatch", action="store_true",
                        help="run even if the region extractor differs from the model's (recall suffers)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warm_up = fused.warm_up()  # a search meanwhile waits for it, and says so
    try:
        retriever = Retriever.from_pretrained(args.checkpoint, cache_dir=CACHE_DIR, cache_max_bytes=CACHE_MAX_BYTES,
                                              allow_extractor_mismatch=args.allow_extractor_mismatch)
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(f"cannot load checkpoint {args.checkpoint!r}: {e}")
    served, problem = open_gallery(args.gallery, retriever.model) if args.gallery else (None, None)
    if problem:
        logger.warning("%s", problem)
    elif served is not None:
        logger.info("serving the gallery %s: %d images", args.gallery, len(served))
    demo = build_demo(retriever, args.checkpoint, kernels_building=warm_up.is_alive, served=served,
                      served_problem=problem)
    demo.queue(default_concurrency_limit=2, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE, show_error=True)


if __name__ == "__main__":
    main()
