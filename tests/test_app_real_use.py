"""The app under real use (issue 17): bad and huge files, identical concurrent requests, bounded
resources, progress, user text shown literally, the user's file names, unreadable captions, a clear
API. Driven through gradio_client and a headless Chromium against the launched app."""

import logging
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageFile

import app
import app_logic
from conftest import CAT, rank
from adapt import AdaptConfig, AdaptModel
from adapt.cache import RegionCache
from adapt.pipeline import Retriever
from adapt.regions import build_extractor, load_image
from adapt.search import GalleryIndex
from checkpoints import DEFAULT_CHECKPOINT
from training.index import index_images

# A photo with two distinct objects: a man in a striped shirt and a soccer ball (Debian opencv-doc).
MESSI = Path("/usr/share/doc/opencv-doc/examples/data/messi5.jpg")
CHROMIUM = Path("/usr/bin/chromium")


def messages(job) -> list[tuple[str, str]]:
    """The (message, level) pairs a gradio_client job received (gr.Warning, gr.Info), once done."""
    job.result()
    updates = []
    while not job.communicator.updates.empty():
        updates.append(job.communicator.updates.get_nowait())
    return [u.log for u in updates if getattr(u, "log", None)]


def progress_units(job) -> list:
    """The gr.Progress updates a gradio_client job received."""
    updates = []
    while not job.communicator.updates.empty():
        updates.append(job.communicator.updates.get_nowait())
    return [unit for u in updates for unit in (getattr(u, "progress_data", None) or [])]


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Pixel counts of every image decoded in this process (the app's) while a test runs."""
    sizes = []
    load = ImageFile.ImageFile.load

    def recording_load(image):
        sizes.append(image.size[0] * image.size[1])
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


# 1. Another caption, another picture.

def test_another_caption_changes_the_highlight(client):
    captions = "a soccer ball\na man in a red and blue striped shirt"
    table, first, first_caption, _, highlighted, _ = rank(client, handle_file(str(MESSI)), captions)
    second, second_caption = client.predict(2, api_name="/highlight_caption")
    assert highlighted == 1 and first_caption == table["data"][0][1] and second_caption == table["data"][1][1]
    assert Path(first).read_bytes() != Path(second).read_bytes()
    with pytest.raises(AppError, match="Pick a rank from 1 to 2"):
        client.predict(3, api_name="/highlight_caption")


# 2. Uploads reach the app undecoded; it decodes them once, with its own loader.

@pytest.mark.parametrize("name,content,message", [
    ("empty.jpg", b"", "^empty.jpg: empty file"),
    ("text.jpg", b"this is a text file", "^text.jpg: not an image file Pillow can read"),
])
def test_broken_uploads_get_the_apps_message(client, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AppError, match=message):
        rank(client, handle_file(str(tmp_path / name)), "a cat")


def test_a_png_bomb_is_refused_before_decoding(client, tmp_path, decoded_sizes):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (13000, 13000)).save(bomb)  # 169 Mpx in a few hundred KB
    with pytest.raises(AppError, match=r"^bomb.png: 13000x13000 = 169,000,000 pixels exceeds"):
        rank(client, handle_file(str(bomb)), "a cat")
    assert max(decoded_sizes, default=0) <= app_logic.MAX_PIXELS


def test_a_16_bit_png_is_decoded_by_the_apps_loader(client, served, tmp_path):
    levels = np.tile(np.linspace(0, 65535, 320).astype(np.uint16), (240, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)  # mode I;16: PIL's own RGB conversion clips it to white
    rank(client, handle_file(str(path)), "a grey ramp")
    key = RegionCache.key(load_image(path))
    assert served[1].cache.get(key) is not None, "the regions are those of the correctly decoded pixels"


# 4. Resource bounds.

def test_a_large_jpeg_is_decoded_at_a_reduced_scale(client, tmp_path, decoded_sizes):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (9600, 6400), (200, 120, 40)).save(big, quality=80)  # 61 Mpx > the app's limit
    table = rank(client, handle_file(str(big)), "an orange wall")[0]
    assert len(table["data"]) == 1
    assert 0 < max(decoded_sizes) <= app_logic.MAX_PIXELS


def test_the_region_cache_keeps_the_most_recent_images_within_its_budget(client, served, tmp_path, monkeypatch):
    cache = served[1].cache
    one_file = max(p.stat().st_size for p in cache.folder.glob("*.npz"))
    monkeypatch.setattr(cache, "max_bytes", 3 * one_file)
    photo = Image.open(CAT)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"crop{i}.png")
        photo.crop((i, i, 200 + i, 150 + i)).save(paths[-1])
    for path in paths:
        client.predict([handle_file(str(path))], api_name="/add_images")
    assert sum(p.stat().st_size for p in cache.folder.glob("*.npz")) <= 3 * one_file
    for path in paths[-2:]:
        assert cache.get(RegionCache.key(load_image(path))) is not None


def test_drawings_are_files_in_gradios_cache_deleted_on_its_schedule_and_bounded(served, tmp_path):
    assert served[2].delete_cache == app.DELETE_CACHE
    assert served[3].drawings.folder.is_relative_to(get_upload_folder())
    drawings = app_logic.DrawingFiles(tmp_path, keep=2)
    paths = [drawings.save(Image.new("RGB", (8, 8))) for _ in range(3)]
    assert [Path(p).exists() for p in paths] == [False, True, True]


# 3. Identical concurrent requests.

def test_identical_requests_never_share_an_output_file(served):
    client = Client(served[0], verbose=False, download_files=False)
    urls = [rank(client, handle_file(CAT), "a cat")[1]["url"] for _ in range(2)]
    assert urls[0] != urls[1]


def test_identical_concurrent_requests_all_succeed(served):
    errors, results = [], []

    def user() -> None:
        try:
            user_client = Client(served[0], verbose=False)
            for _ in range(2):
                results.append(Image.open(rank(user_client, handle_file(CAT), app.EXAMPLE_CAPTIONS)[1]).size)
        except Exception as e:  # every failure is what this test looks for
            errors.append(e)

    users = [threading.Thread(target=user) for _ in range(8)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=300)
    assert errors == [] and len(results) == 16


# 5. Progress and a responsive queue.

def test_adding_images_reports_progress_with_a_count(served, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"shifted{i}.png")
        Image.open(CAT).crop((10 * i, 0, 300 + 10 * i, 200)).save(paths[-1])
    job = Client(served[0], verbose=False).submit([handle_file(str(p)) for p in paths], api_name="/add_images")
    job.result()
    units = progress_units(job)
    assert {(u.index, u.length, u.unit) for u in units} >= {(0, 3, "images"), (2, 3, "images")}


def test_too_many_files_at_once_are_refused_and_adding_has_its_own_queue(client, served, tmp_path):
    path = tmp_path / "one.png"
    Image.open(CAT).save(path)
    with pytest.raises(AppError, match=f"add at most {app_logic.MAX_FILES_PER_ADD} at a time"):
        client.predict([handle_file(str(path))] * (app_logic.MAX_FILES_PER_ADD + 1), api_name="/add_images")
    add = next(f for f in served[2].fns.values() if f.api_name == "add_images")
    others = [f for f in served[2].fns.values() if f.api_name in ("rank_captions", "search_gallery")]
    assert add.concurrency_limit == 1 and all(f.concurrency_id != add.concurrency_id for f in others)


def test_a_search_while_the_kernels_build_says_so(served, monkeypatch):
    monkeypatch.setattr(served[3], "kernels_building", lambda: True)
    job = Client(served[0], verbose=False).submit("a cat", 2, api_name="/search_gallery")
    assert (app_logic.KERNELS_MESSAGE, "info") in messages(job)


# 7. The user's file names, never the server's paths.

def test_messages_name_the_uploaded_file_not_the_servers_copy(client, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    with pytest.raises(AppError) as refused:
        rank(client, handle_file(str(bad)), "a cat")
    assert str(refused.value).startswith("holiday.jpg: ") and get_upload_folder() not in str(refused.value)
    job = client.submit([handle_file(CAT), handle_file(str(bad))], api_name="/add_images")
    warnings = [text for text, level in messages(job) if level == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("holiday.jpg: ")
    assert get_upload_folder() not in warnings[0]


# 8. Captions the text encoder cannot read.

def test_a_caption_of_unknown_words_gets_a_warning(client):
    job = client.submit(handle_file(CAT), "a cat\nzzqx blorfle", api_name="/rank_captions")
    assert ("The model knows none of the words of caption 2; its score means little.", "warning") in messages(job)
    assert messages(client.submit(handle_file(CAT), "a cat", api_name="/rank_captions")) == []


@pytest.fixture(scope="module")
def transformer_served(tmp_path_factory):
    """The app on a small untrained model with the transformer text encoder and one scoring."""
    folder = tmp_path_factory.mktemp("transformer")
    extractor = build_extractor()
    AdaptModel(AdaptConfig(region_dim=extractor.feature_dim, latent_size=32, similarity="t2i",
                           text_encoder="transformer", extractor=extractor.identity)).save_pretrained(folder)
    retriever = Retriever.from_pretrained(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    demo = app.build_demo(app.Demo(retriever), str(folder))
    yield launch(demo), retriever, demo
    demo.close()


def test_word_pieces_that_are_all_unknown_get_a_warning(transformer_served):
    client = Client(transformer_served[0], verbose=False)
    tokenizer = transformer_served[1].model.text_encoder.tokenizer
    assert set(tokenizer("🐱🐱🐱", add_special_tokens=False)["input_ids"]) == {tokenizer.unk_token_id}
    job = client.submit(handle_file(CAT), "🐱🐱🐱\n🚀🔥\na cat 🐱", api_name="/rank_captions")
    assert ("The model knows none of the words of captions 1, 2; their scores mean little.", "warning") \
        in messages(job)
    job = client.submit("🚀🔥", 2, api_name="/search_gallery")
    assert ("The model knows none of the words of caption 1; its score means little.", "warning") in messages(job)


# 9. A clear API, quiet logs, only the scorings the model has.

def test_every_endpoint_and_output_is_named(client, served):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/rank_captions", "/highlight_caption", "/search_gallery",
                                           "/highlight_hit", "/add_images", "/clear_gallery"}
    assert api["unnamed_endpoints"] == {}
    returns = [r["label"] for e in api["named_endpoints"].values() for r in e["returns"]]
    assert all(label and not label.startswith("value_") for label in returns)
    assert all(f.api_name for f in served[2].fns.values())


def test_a_refused_input_logs_one_line_and_no_traceback(client, caplog, capfd):
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="adapt.app"):
        with pytest.raises(AppError):
            rank(client, handle_file(CAT), "")
    assert [r.getMessage() for r in caplog.records if r.name == "adapt.app"] == [
        "refused: Type at least one caption, one per line."]
    assert "Traceback" not in capfd.readouterr().err


def scoring_radio(demo) -> dict:
    return next(c["props"] for c in demo.config["components"] if c["props"].get("label") == "Scoring")


def test_the_scoring_radio_offers_what_the_model_computes(served, transformer_served):
    # An ensemble offers T2I, I2T, the ensemble and the baseline, and starts on its own kind.
    radio = scoring_radio(served[2])
    assert [name for name, _ in radio["choices"]] == list(app_logic.SCORING)
    assert radio["visible"] is not False and app_logic.SCORING[radio["value"]] == ("t2i", "i2t")
    # A T2I model offers its own head and the baseline on the same encoders; each one ranks.
    two = scoring_radio(transformer_served[2])
    assert [app_logic.SCORING[name] for name, _ in two["choices"]] == [("t2i",), ("mean",)]
    assert app_logic.SCORING[two["value"]] == ("t2i",)
    for name, _ in two["choices"]:
        table = rank(Client(transformer_served[0], verbose=False), handle_file(CAT), "a cat\na dog", scoring=name)[0]
        assert len(table["data"]) == 2


# 6 and 9 in the browser: user text shown as text, the upload box emptied after adding.

def chromium_page(url: str):
    """A headless Debian Chromium page on the app at ``url`` (a generator: the page, then closed);
    ``page.dialogs`` holds what it tried to alert."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.dialogs = []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url)
        yield page
        browser.close()


@pytest.fixture
def page(served):
    yield from chromium_page(served[0])


@pytest.fixture
def served_gallery_page(gallery_served):
    yield from chromium_page(gallery_served[0])


def launch(demo) -> str:
    """Queue and launch a demo in this process; its URL."""
    demo.queue(default_concurrency_limit=2)
    return demo.launch(prevent_thread_lock=True, max_file_size=app.MAX_FILE_SIZE)[1]


def test_browser_shows_captions_and_file_names_as_text(page, tmp_path):
    from playwright.sync_api import expect

    markup = ["<img src=x onerror=alert(2)>", "$$x^2$$", "**bold** <b>b</b>"]
    page.locator("input[type=file]").first.set_input_files(CAT)
    page.get_by_label("Captions, one per line").fill("\n".join(markup))
    page.get_by_role("button", name="Rank captions").click()
    table, caption = page.locator("#ranked-captions"), page.locator("#highlighted-caption textarea")
    expect(table.locator('[data-testid="cell-2-1"]')).not_to_be_empty(timeout=60_000)
    for row in range(len(markup)):
        shown = table.locator(f'[data-testid="cell-{row}-1"]')
        shown.click()
        expect(caption).to_have_value(shown.inner_text().strip(), timeout=30_000)
        assert shown.inner_text().strip() in markup
    bad = tmp_path / "<img src=x onerror=alert(3)>.jpg"
    bad.write_text("not a picture")
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.get_by_role("button", name="Rank captions").click()
    page.get_by_text("not an image file Pillow can read").first.wait_for(timeout=60_000)
    # Gradio's upload drops the file name's < and >; the rest of it names the file in the message.
    assert page.get_by_text("img src=x onerror=alert(3).jpg: not an image file").count() >= 1
    assert page.locator('img[src="x"]').count() == 0 and page.dialogs == []
    assert page.locator(".katex, math").count() == 0
    assert page.locator("strong, b").filter(has_text="bold").count() == 0


def test_browser_upload_box_empties_after_adding(page):
    page.get_by_role("tab", name="Search gallery").click()
    page.locator("input[type=file]").last.set_input_files(str(MESSI))
    page.get_by_text(f"{len(app.EXAMPLES) + 1} images").wait_for(timeout=60_000)
    page.wait_for_function("() => !document.body.innerText.includes('messi5.jpg')", timeout=10_000)


# Issue 15: a served gallery in the Search tab.

@pytest.fixture(scope="module")
def gallery_served(checkpoint, tmp_path_factory):
    """The app serving a gallery of three photos built by training.index, on the test checkpoint."""
    photos = tmp_path_factory.mktemp("served-photos")
    for photo in (Path(CAT), MESSI, app.ROOT / "examples" / "rocket.jpg"):
        shutil.copy(photo, photos / photo.name)
    retriever = Retriever.from_pretrained(checkpoint, cache_dir=tmp_path_factory.mktemp("cache"))
    folder = tmp_path_factory.mktemp("served") / "index"
    built = GalleryIndex.create(folder, retriever.model)
    index_images(built, retriever, photos, sorted(p.name for p in photos.iterdir()), thumbnail_size=256)
    demo = app.build_demo(app.Demo(retriever, served=GalleryIndex.open(folder, retriever.model)), str(checkpoint))
    yield launch(demo), retriever, demo
    demo.close()


def test_a_served_gallery_is_searched_with_the_sessions_uploads(gallery_served):
    client = Client(gallery_served[0], verbose=False)
    hits, status, _, shown = client.predict("a cat", 5, api_name="/search_gallery")
    assert len(hits) == 3 and status == "Searched **3 images** (3 served, 0 of yours)."
    assert shown.split(" (")[0] in {"1. cat.jpg", "1. messi5.jpg", "1. rocket.jpg"}
    client.predict([handle_file(CAT)], api_name="/add_images")
    hits, status, _, _ = client.predict("a cat", 5, api_name="/search_gallery")
    assert len(hits) == 4 and status == "Searched **4 images** (3 served, 1 of yours)."


def test_a_gallery_that_cannot_be_served_is_explained_in_the_search_tab(served):
    problem = "The gallery index is not served: /x was built with a different model (latent_size: index 8, model 32)."
    demo = app.build_demo(app.Demo(served[1], served_problem=problem), "checkpoint")
    status = next(c["props"]["value"] for c in demo.config["components"] if c["props"].get("elem_id") == "gallery-status")
    assert status.startswith(problem) and "sample" not in status


def test_browser_searches_the_served_gallery_and_shows_the_selected_match(served_gallery_page):
    from playwright.sync_api import expect

    page = served_gallery_page
    page.get_by_role("tab", name="Search gallery").click()
    page.get_by_text("The served gallery holds 3 images").wait_for(timeout=30_000)
    page.get_by_role("textbox", name="Caption", exact=True).fill("a man kicking a soccer ball")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_text("Searched 3 images (3 served, 0 of yours).").wait_for(timeout=60_000)
    caption = expect(page.locator("#hit-caption textarea"))
    caption.to_have_value(re.compile(r"^1\. .+ \(-?\d\.\d{3}\); looked at "), timeout=30_000)
    drawing = page.locator("#hit-drawing img")
    first_src = drawing.get_attribute("src")
    thumbnails = page.locator("#search-results .thumbnail-item")
    expect(thumbnails).to_have_count(3, timeout=30_000)
    thumbnails.nth(1).click()
    caption.to_have_value(re.compile(r"^2\. "), timeout=30_000)
    expect(drawing).not_to_have_attribute("src", first_src, timeout=30_000)
    assert page.get_by_text("Traceback").count() == 0


# Issue 33, finding 9: what the model sees, beside the ranking.

@pytest.fixture(scope="module")
def bundled_page():
    """A browser page on the app serving the bundled model, whose extractor also reads the scene."""
    demo = app.build_demo(app.Demo(Retriever.from_pretrained(DEFAULT_CHECKPOINT)), str(DEFAULT_CHECKPOINT))
    yield from chromium_page(launch(demo))
    demo.close()


def test_browser_shows_what_the_model_sees_beside_the_ranking(bundled_page):
    from playwright.sync_api import expect

    page = bundled_page
    page.locator("input[type=file]").first.set_input_files(str(app.ROOT / "examples" / "astronaut.jpg"))
    page.get_by_role("button", name="Rank captions").click()
    seen = page.locator("#seen-concepts")
    # The detector's trusted "person" and the scene classifier's reading of the whole photo, which
    # explains why the rocket caption beats the space-suit one here.
    expect(seen).to_contain_text("space shuttle", timeout=60_000)
    shown = seen.inner_text()
    for name in ("person", "football helmet", "projectile", "space shuttle"):
        assert re.search(rf"{name}\s+\d+%", shown), (name, shown)  # each with its score
    assert "mouse" not in shown  # detected at 0.43, under the trust threshold
    expect(page.locator("#ranked-captions")).to_contain_text("A rocket lifting off")
