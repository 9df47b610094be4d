"""ADAPT image-text retrieval demo: rank captions for an image, search a gallery by caption.

    python app.py                                  # the bundled default model, offline
    python app.py --checkpoint user/adapt-model    # a Hub repo id or a local folder
    ADAPT_CHECKPOINT=path python app.py

The UI only wires Gradio components to :mod:`adapt.pipeline`; every input is checked here and
refused with a message in the page, never a traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import gradio as gr

from adapt.model import CheckpointError
from adapt.pipeline import DEFAULT_CHECKPOINT, Gallery, RankedCaptions, Retriever
from adapt.regions import ImageError, load_image
from adapt.visualize import draw_attention

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
CACHE_DIR = Path(os.environ.get("ADAPT_CACHE_DIR", ROOT / ".cache" / "regions"))
MAX_CAPTIONS = 1000
MAX_CAPTION_CHARS = 1000
MAX_GALLERY = 2000
MAX_FILE_SIZE = "25mb"
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


def parse_captions(text: str | None) -> list[str]:
    """Non-empty lines of ``text``; raises :class:`gr.Error` with what to fix."""
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not captions:
        raise gr.Error("Type at least one caption, one per line.")
    if len(captions) > MAX_CAPTIONS:
        raise gr.Error(f"{len(captions)} captions: at most {MAX_CAPTIONS} at a time, please.")
    too_long = [i + 1 for i, c in enumerate(captions) if len(c) > MAX_CAPTION_CHARS]
    if too_long:
        raise gr.Error(f"Caption {too_long[0]} is longer than {MAX_CAPTION_CHARS} characters; "
                       "shorten it (a caption is a sentence or two).")
    return captions


def warn_unknown_words(retriever: Retriever, captions: list[str]) -> None:
    """Warn when a word-vector model knows none of a caption's words (its score means little)."""
    vocab = getattr(retriever.model.text_encoder, "index", None)
    if vocab is None:
        return
    batch = retriever.model.tokenize(captions)
    unknown = [i + 1 for i in range(len(captions)) if bool((batch.ids[i][batch.mask[i]] == 1).all())]
    if unknown:
        gr.Warning(f"The model knows none of the words of caption(s) {unknown[:10]}; "
                   "their scores mean little.")


class Demo:
    """The app's state-free logic, one method per UI action."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.choices = [name for name, dirs in SCORING.items()
                        if set(dirs) <= set(retriever.directions)]
        self.start_state = self.empty_state()
        self._add_files(self.start_state, EXAMPLES)

    def _load(self, path: str | None) -> tuple[Any, Any]:
        if not path:
            raise gr.Error("Upload an image first, or pick one of the examples.")
        try:
            image = load_image(path, self.retriever.extractor.max_pixels)
            return image, self.retriever.regions(image)
        except ImageError as e:
            raise gr.Error(str(e)) from e

    def rank(self, image_path: str | None, captions_text: str, scoring: str, show_boxes: bool):
        """Rank the captions for the image; returns the table, the highlighted image and state."""
        captions = parse_captions(captions_text)
        image, (_, regions) = self._load(image_path)
        warn_unknown_words(self.retriever, captions)
        ranked = self.retriever.rank_captions(regions, captions, SCORING.get(scoring))
        table = [[i + 1, c, round(float(s), 4)] for i, (c, s) in enumerate(zip(ranked.captions, ranked.scores))]
        state = {"image": image_path, "ranked": ranked, "show_boxes": show_boxes}
        drawing, note = self._highlight(image, ranked, 0, show_boxes)
        return table, drawing, note, self._boxes_table(ranked), state

    def _highlight(self, image, ranked: RankedCaptions, row: int, show_boxes: bool):
        weights = None if ranked.region_weights is None else ranked.region_weights[row]
        drawing = draw_attention(image, ranked.regions, weights, all_boxes=show_boxes)
        return drawing, f"Attention of: “{ranked.captions[row]}”"

    @staticmethod
    def _boxes_table(ranked: RankedCaptions) -> list[list]:
        r = ranked.regions
        return [[i + 1, label or "(fill)", round(float(score), 3), str([round(float(v)) for v in box])]
                for i, (label, score, box) in enumerate(zip(r.labels, r.scores, r.boxes))]

    def select_caption(self, state: dict | None, evt: gr.SelectData):
        """Switch the highlight to the clicked ranked caption."""
        if not state:
            raise gr.Error("Rank some captions first.")
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        image = load_image(state["image"], self.retriever.extractor.max_pixels)
        return self._highlight(image, state["ranked"], row, state["show_boxes"])

    @staticmethod
    def empty_state() -> dict:
        """A session's gallery: the :class:`Gallery` and the image file of each key."""
        return {"gallery": Gallery(), "paths": {}}

    def _add_files(self, state: dict, files) -> list[str]:
        """Add image files to a session's gallery; returns the problems of those left out."""
        gallery, paths, problems = state["gallery"], state["paths"], []
        for path in files:
            if len(gallery) >= MAX_GALLERY:
                problems.append(f"the gallery holds at most {MAX_GALLERY} images; the rest were not added")
                break
            try:
                key, regions = self.retriever.regions(str(path))
            except ImageError as e:
                problems.append(str(e))
                continue
            gallery.add(key, regions)
            paths[key] = str(path)
        return problems

    def add_images(self, files: list | None, state: dict):
        """Add uploaded images to the session's gallery (bad files are reported and skipped)."""
        if not files:
            raise gr.Error("Choose one or more image files to add.")
        # Gradio gives every session its own deep copy of the State, so it is changed in place.
        for problem in self._add_files(state, [getattr(f, "name", f) for f in files])[:5]:
            gr.Warning(problem)
        return state, self._gallery_status(state), None

    def clear_gallery(self, state: dict):
        state = self.empty_state()
        return state, self._gallery_status(state), []

    @staticmethod
    def _gallery_status(state: dict) -> str:
        n = len(state["gallery"])
        return f"**{n} image{'s' if n != 1 else ''}** in the gallery." if n else \
            "The gallery is empty: add images to search them."

    def search(self, query: str, top_k: float, state: dict):
        """The gallery images best matching the caption, each with its attended regions drawn."""
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a caption to search for.")
        if len(query) > MAX_CAPTION_CHARS:
            raise gr.Error(f"The query is longer than {MAX_CAPTION_CHARS} characters; shorten it.")
        if len(state["gallery"]) == 0:
            raise gr.Error("The gallery is empty: add images first (or reload the page for the samples).")
        warn_unknown_words(self.retriever, [query])
        hits = self.retriever.search(state["gallery"], query, top_k=int(top_k))
        images = []
        for hit in hits:
            image = load_image(state["paths"][hit.key], self.retriever.extractor.max_pixels)
            images.append((draw_attention(image, hit.regions, hit.region_weights, max_side=640),
                           f"{hit.score:.3f}"))
        return images


def model_card(checkpoint: str) -> str:
    """The checkpoint's model card (README.md), or its config when it has none."""
    card = Path(checkpoint) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        return text.split("---", 2)[-1] if text.startswith("---") else text
    return f"Checkpoint `{checkpoint}` has no model card."


def build_demo(retriever: Retriever, checkpoint: str) -> gr.Blocks:
    """The Gradio Blocks UI around a retriever."""
    demo_logic = Demo(retriever)
    with gr.Blocks(title="ADAPT image-text retrieval") as demo:
        gr.Markdown("# ADAPT: adaptive cross-modal embeddings\nRank captions for an image, or search "
                    "images with a caption. The highlight shows which regions the caption's fovea "
                    "attended to (Wehrmann et al., AAAI 2020).")
        with gr.Tab("Rank captions"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=360)
                    gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image], label="Example photos")
                    captions = gr.Textbox(EXAMPLE_CAPTIONS, lines=8, max_lines=30, label="Captions, one per line")
                    scoring = gr.Radio(demo_logic.choices, value=demo_logic.choices[-1], label="Scoring")
                    show_boxes = gr.Checkbox(False, label="Outline every detected region on the image")
                    rank_button = gr.Button("Rank captions", variant="primary")
                with gr.Column():
                    highlight = gr.Image(label="Attention of the selected caption", type="pil",
                                         interactive=False, height=360)
                    highlight_note = gr.Markdown()
                    ranked = gr.Dataframe(headers=["rank", "caption", "score"], datatype=["number", "str", "number"],
                                          label="Ranked captions (click one to see its attention)",
                                          interactive=False, wrap=True, column_widths=["10%", "72%", "18%"])
                    with gr.Accordion("Detected regions and their labels", open=False):
                        boxes = gr.Dataframe(headers=["region", "label", "detector score", "box (x1, y1, x2, y2)"],
                                             interactive=False)
            rank_state = gr.State()
            rank_button.click(demo_logic.rank, [image, captions, scoring, show_boxes],
                              [ranked, highlight, highlight_note, boxes, rank_state], api_name="rank_captions")
            ranked.select(demo_logic.select_caption, [rank_state], [highlight, highlight_note],
                          api_visibility="private")
        with gr.Tab("Search gallery"):
            gallery_state = gr.State(demo_logic.start_state)
            with gr.Row():
                query = gr.Textbox(label="Caption", placeholder="a cat lying on a blanket", scale=4)
                top_k = gr.Slider(1, 50, value=8, step=1, label="Results", scale=1)
            search_button = gr.Button("Search", variant="primary")
            results = gr.Gallery(label="Best matches (score), attended regions lit", columns=4, height="auto")
            gallery_status = gr.Markdown(Demo._gallery_status(gallery_state.value))
            with gr.Row():
                uploads = gr.File(file_count="multiple", file_types=["image"], label="Add images to the gallery")
                clear_button = gr.Button("Clear the gallery", variant="stop")
            search_button.click(demo_logic.search, [query, top_k, gallery_state], results, api_name="search_gallery")
            query.submit(demo_logic.search, [query, top_k, gallery_state], results, api_visibility="private")
            uploads.upload(demo_logic.add_images, [uploads, gallery_state], [gallery_state, gallery_status, uploads],
                           api_name="add_images")
            clear_button.click(demo_logic.clear_gallery, [gallery_state], [gallery_state, gallery_status, results],
                               api_name="clear_gallery")
        with gr.Tab("About"):
            gr.Markdown(model_card(checkpoint))
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.environ.get("ADAPT_CHECKPOINT", str(DEFAULT_CHECKPOINT)),
                        help="local folder or Hub repo id (default: $ADAPT_CHECKPOINT or the bundled model)")
    parser.add_argument("--allow-extractor-mismatch", action="store_true",
                        help="run even if the region extractor differs from the model's (recall suffers)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    try:
        retriever = Retriever.from_pretrained(args.checkpoint, cache_dir=CACHE_DIR,
                                              allow_extractor_mismatch=args.allow_extractor_mismatch)
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(f"cannot load checkpoint {args.checkpoint!r}: {e}")
    demo = build_demo(retriever, args.checkpoint)
    demo.queue(default_concurrency_limit=2, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE, show_error=True)


if __name__ == "__main__":
    main()
