"""The real app, launched and driven through gradio_client and a headless Chromium."""

import io
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import app_logic
from adapt.visualize import seen_concepts
from conftest import CAT, rank

def test_rank_captions_orders_by_score_and_highlights_the_image(client, served):
    captions = "A cat lying on a purple blanket.\nA rocket lifting off from a launch pad.\nzebra stripes"
    table, highlight, caption, boxes, highlighted_rank, seen = rank(client, handle_file(CAT), captions, boxes=True)
    scores = [row[2] for row in table["data"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    expected = served[1].rank_captions(CAT, captions.splitlines())
    assert [row[1] for row in table["data"]] == expected.captions
    assert Image.open(highlight).size[0] > 0
    assert caption == table["data"][0][1] and highlighted_rank == 1
    assert "cat" in [row[1] for row in boxes["data"]]  # the detector's labels, in the regions panel
    # What the model sees: the trusted detector labels (this checkpoint's extractor has no scene classifier).
    assert [c["label"] for c in seen["confidences"]] == ["cat"] == [name for name, _ in seen_concepts(expected.regions)]


@pytest.mark.parametrize("scoring", [name for name, dirs in app_logic.SCORING.items() if "mean" not in dirs])
def test_every_scoring_direction_runs(client, scoring):
    table = rank(client, handle_file(CAT), "a cat\na dog", scoring)[0]
    assert len(table["data"]) == 2


def test_empty_lines_are_ignored_and_many_odd_captions_work(client):
    captions = "\n\n a cat \n\nУ кошки зелёные глаза 🐱\n" + "\n".join(f"caption number {i}" for i in range(498))
    table = rank(client, handle_file(CAT), captions)[0]
    assert len(table["data"]) == 500
    assert "a cat" in {row[1] for row in table["data"]}


@pytest.mark.parametrize("image,captions,message", [
    (None, "a cat", "Upload an image first"),
    ("cat", "", "at least one caption"),
    ("cat", " \n\n  ", "at least one caption"),
    ("cat", "a" * 5000, "longer than 1000 characters"),
    ("cat", "\n".join(["a cat"] * 1001), "at most 1000"),
])
def test_bad_inputs_get_clear_messages(client, image, captions, message):
    with pytest.raises(AppError, match=message):
        rank(client, handle_file(CAT) if image else None, captions)


def test_truncated_and_oversized_images_are_refused_with_a_message(client, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(CAT).read_bytes()[:2000])
    with pytest.raises(AppError, match="(?i)truncated|corrupt"):
        rank(client, handle_file(str(truncated)), "a cat")
    huge = tmp_path / "huge.png"
    Image.new("L", (13000, 13000)).save(huge)  # 169 Mpx, a few hundred KB as PNG
    with pytest.raises(AppError, match="(?i)pixels"):
        rank(client, handle_file(str(huge)), "a cat")


def test_a_non_image_file_is_refused(client, tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture")
    # The app's own loader refuses it (Gradio's image component no longer decodes uploads first),
    # naming the user's file, not the server's copy of it.
    with pytest.raises(AppError, match="^notes.jpg: not an image file Pillow can read"):
        rank(client, handle_file(str(fake)), "a cat")


def test_gallery_search_add_and_clear(client, tmp_path):
    hits, status, drawing, shown = client.predict("a cat lying on a blanket", 3, api_name="/search_gallery")
    assert len(hits) == 3 and all(Image.open(h["image"]).size[0] > 0 for h in hits)
    scores = [float(h["caption"]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert f"Searched **{len(app.EXAMPLES)} images**" in status
    assert Image.open(drawing).size[0] > 0 and shown.startswith("1. ") and f"({hits[0]['caption']})" in shown
    second, shown = client.predict(2, api_name="/highlight_hit")
    assert shown.startswith("2. ") and f"({hits[1]['caption']})" in shown
    with pytest.raises(AppError, match="Pick a match from 1 to 3"):
        client.predict(4, api_name="/highlight_hit")

    status, _ = client.predict(api_name="/clear_gallery")[:2]
    assert "empty" in status
    with pytest.raises(AppError, match="gallery is empty"):
        client.predict("a cat", 3, api_name="/search_gallery")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    status = client.predict([handle_file(CAT), handle_file(str(bad))], api_name="/add_images")[0]
    assert "1 image" in status
    assert len(client.predict("a cat", 10, api_name="/search_gallery")[0]) == 1

    # Each session has its own gallery: a new session still starts from the sample photos.
    other = Client(client.src, verbose=False)
    assert len(other.predict("a cat", 10, api_name="/search_gallery")[0]) == len(app.EXAMPLES)


def test_search_with_an_empty_query_is_refused(client):
    with pytest.raises(AppError, match="Type a caption"):
        client.predict("   ", 3, api_name="/search_gallery")


def test_region_cache_makes_a_second_query_skip_extraction(served, monkeypatch):
    retriever = served[1]
    retriever.regions(CAT)
    monkeypatch.setattr(retriever.extractor, "extract_batch", lambda *a, **k: pytest.fail("extracted again"))
    key, regions = retriever.regions(np.asarray(Image.open(CAT)))  # same pixels, another source
    assert regions.features.shape == (36, retriever.extractor.feature_dim)


def test_browser_upload_rank_and_switch_the_highlight(served):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    url, retriever, _, _ = served
    expected = retriever.rank_captions(CAT, app.EXAMPLE_CAPTIONS.splitlines()).captions  # the default scoring
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(CAT)
        page.get_by_role("button", name="Rank captions").click()
        caption = playwright.expect(page.locator("#highlighted-caption textarea"))
        caption.to_have_value(expected[0], timeout=60_000)
        table = page.locator("#ranked-captions")
        shown = [table.locator(f'[data-testid="cell-{row}-1"]').inner_text() for row in range(len(expected))]
        highlight = page.locator("#highlight img")
        first_src = highlight.get_attribute("src")
        first = page.request.get(first_src).body()
        table.locator('[data-testid="cell-2-1"]').click()
        caption.to_have_value(expected[2], timeout=30_000)
        playwright.expect(highlight).not_to_have_attribute("src", first_src)
        second = page.request.get(highlight.get_attribute("src")).body()
        browser.close()
    assert shown == expected, "the table shows the captions in the retriever's order"
    first_pixels, second_pixels = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (first, second))
    assert first_pixels.shape == second_pixels.shape
    assert (first_pixels != second_pixels).any(), "another caption lights other regions"


def test_spaces_header_matches_requirements_and_the_app():
    import yaml

    readme = (app.ROOT / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(readme.split("---")[1])
    pins = dict(line.split("==") for line in (app.ROOT / "requirements.txt").read_text().split() if "==" in line)
    assert header["sdk"] == "gradio" and header["sdk_version"] == pins["gradio"]
    assert (app.ROOT / header["app_file"]).is_file()
    assert header["license"] == "apache-2.0"


def test_pyproject_pins_are_those_spaces_and_the_tests_install():
    import tomllib

    def pins(lines):
        return dict(line.split("==") for line in lines if "==" in line)

    project = tomllib.loads((app.ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert pins(project["dependencies"] + extras["training"] + extras["app"]) == pins(
        (app.ROOT / "requirements.txt").read_text().split())
    assert pins(extras["tests"]) == pins((app.ROOT / "tests" / "requirements.txt").read_text().split())
    assert "adapt[training,app]" in extras["tests"]
    # The Qdrant first stage is optional: an extra the tests install, not what Spaces installs.
    assert set(pins(extras["qdrant"])) <= set(pins(extras["tests"]))
    assert "qdrant" not in (app.ROOT / "requirements.txt").read_text()
