"""ADAPT image-text retrieval demo: rank captions for an image, search a gallery by caption.

    python app.py                                  # the bundled default model, offline
    python app.py --checkpoint user/adapt-model    # a Hub repo id or a local folder
    ADAPT_CHECKPOINT=path python app.py
    python app.py --gallery INDEX                  # also search a gallery built by training.index
    ADAPT_GALLERY=INDEX python app.py              # the same, e.g. in a Space's settings

The UI only wires Gradio components to the app's logic, :class:`app_logic.Demo` (one method per
action; every input is checked there and refused with a message in the page, never a traceback),
which runs :mod:`adapt.pipeline` and the galleries of :mod:`adapt.gallery`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData, ImageData, ListFiles
from gradio.processing_utils import save_base64_to_cache
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from adapt import fused
from adapt.model import CheckpointError
from adapt.pipeline import Retriever, read_model_card
from app_logic import (
    EXAMPLES,
    LONG_AT_ONCE,
    MAX_RESULTS,
    ROOT,
    SHORT_AT_ONCE,
    BoundedUploads,
    Demo,
    open_gallery,
    refuse,
)
from checkpoints import DEFAULT_CHECKPOINT


logger = logging.getLogger("adapt.app")

CACHE_DIR = Path(os.environ.get("ADAPT_CACHE_DIR", ROOT / ".cache" / "regions"))
# About 5000 images' regions; the least recently used are deleted beyond it.
CACHE_MAX_BYTES = int(os.environ.get("ADAPT_CACHE_MAX_MB", 1024)) * 2**20
MAX_FILE_SIZE = 25 * 2**20  # bytes, for an upload and for a pasted image alike
# Uploads and drawings in Gradio's cache older than a day are deleted, checked every hour.
DELETE_CACHE = (3600, 86400)
# Beyond this many bytes of them in all, the oldest are deleted at once (one upload may be this large).
UPLOADS_MAX_BYTES = int(os.environ.get("ADAPT_UPLOADS_MAX_MB", 2048)) * 2**20
EXAMPLE_CAPTIONS = "\n".join([
    "A group of people observing two planes at an air show.",
    "A large white dog is sitting on a bench beside an elderly man.",
    "A woman in a space suit smiling in front of a flag.",
    "A cat lying on a purple blanket.",
    "A cup of coffee on a saucer on a wooden table.",
    "A rocket lifting off from a launch pad.",
    "An officer in a navy uniform posing for a portrait.",
])


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
            name = payload.orig_name or "pasted.png"
            # Gradio's upload limit does not apply to data in the request: its size from the base64
            # length (4 characters per 3 bytes), before anything is decoded or written.
            size = (len(payload.url) - payload.url.find(",") - 1) * 3 // 4
            if size > MAX_FILE_SIZE:
                raise refuse(f"{name}: {size / 2**20:.1f} MB is more than the {MAX_FILE_SIZE // 2**20} MB an image "
                             "may have; save it smaller (e.g. as a JPEG) and upload it again.")
            return save_base64_to_cache(payload.url, component.GRADIO_CACHE, name)
        return payload.path

    component.preprocess = upload_path
    return component


def files_upload(**kwargs: Any) -> gr.File:
    """A ``gr.File`` of several files whose uploads reach the app as their paths.

    ``gr.File``'s own preprocessing also creates an empty temporary file per upload in Gradio's
    folder (and leaves it there); its file-type check refused a whole batch for one odd file, where
    the app checks each file itself and reports those left out.
    """
    component = gr.File(file_count="multiple", type="filepath", **kwargs)

    def upload_paths(payload: ListFiles | FileData | None) -> list[str] | None:
        if payload is None:
            return None
        return [f.path for f in (payload.root if isinstance(payload, ListFiles) else [payload])]

    component.preprocess = upload_paths
    return component


def checked_by_the_app(component: gr.Number | gr.Slider) -> gr.Number | gr.Slider:
    """``component`` passing its number to the app unchecked: the app's handler checks the range and
    refuses with its own message in one log line, where Gradio's own check prints a traceback."""
    component.preprocess = lambda payload: payload
    return component


def build_demo(demo_logic: Demo, checkpoint: str) -> gr.Blocks:
    """The Gradio Blocks UI wired to ``demo_logic``; the About tab shows ``checkpoint``'s model card."""
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
                        highlight_rank = checked_by_the_app(gr.Number(
                            1, label="Rank of the highlighted caption", precision=0, minimum=1, scale=1))
                    ranked = gr.Dataframe(headers=["rank", "caption", "score"], datatype=["number", "str", "number"],
                                          label="Ranked captions (click one to see its attention)",
                                          interactive=False, wrap=True, column_widths=["10%", "72%", "18%"],
                                          elem_id="ranked-captions")
                    seen = gr.Label(label="What the model sees: detected objects and the photo's scene classes",
                                    show_heading=False, elem_id="seen-concepts")
                    with gr.Accordion("Detected regions and their labels", open=False):
                        boxes = gr.Dataframe(headers=["region", "label", "detector score", "box (x1, y1, x2, y2)"],
                                             label="Detected regions", interactive=False)
            rank_state = gr.State()
            rank_button.click(demo_logic.rank, [image, captions, scoring, show_boxes],
                              [ranked, highlight, highlight_caption, boxes, highlight_rank, seen, rank_state],
                              api_name="rank_captions", concurrency_limit=LONG_AT_ONCE + SHORT_AT_ONCE,
                              concurrency_id="rank_captions")
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
                top_k = checked_by_the_app(gr.Slider(1, MAX_RESULTS, value=8, step=1, label="Results", scale=1))
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
                        hit_rank = checked_by_the_app(gr.Number(1, label="Rank of the selected match", precision=0,
                                                                minimum=1, scale=1))
            gallery_status = gr.Markdown(demo_logic.gallery_status(gallery_state.value), label="Gallery status",
                                         elem_id="gallery-status")
            with gr.Row():
                uploads = files_upload(file_types=["image"], label="Add images to the gallery")
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
            gr.Markdown(read_model_card(checkpoint) or f"Checkpoint `{checkpoint}` has no model card.")
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
    # An upload folder of this process's own (Gradio's components read it when built), deleted when
    # the app stops: on Ctrl-C and on SIGTERM alike, which is how a Space is restarted.
    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)
    uploads = Path(tempfile.mkdtemp(prefix="adapt-app-", dir=get_upload_folder())).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo = build_demo(Demo(retriever, kernels_building=warm_up.is_alive, served=served, served_problem=problem),
                      args.checkpoint)
    demo.queue(default_concurrency_limit=2, max_size=32)
    examples = frozenset(path for block in demo.blocks.values() for path in getattr(block, "keep_in_cache", ()))
    bound = Middleware(BoundedUploads, folder=uploads, max_bytes=UPLOADS_MAX_BYTES, keep=examples)
    try:
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE, show_error=True,
                    app_kwargs={"middleware": [bound]})
    finally:
        shutil.rmtree(uploads, ignore_errors=True)


if __name__ == "__main__":
    main()
