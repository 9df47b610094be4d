"""training.extract: real photos -> precomp files with boxes; skipped images; resume after a crash."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

import training.extract as extract
from adapt.regions import SsdEfficientNetExtractor
from training.data import load_image_rows, load_split
from training.extract import EXTRACTOR_FILE, ExtractError, ImageRecord, extract_dataset, main, read_records

K = 36


def captions(name: str, n: int = 5) -> list[dict]:
    return [{"raw": f"caption {i} of the {name}\nphoto "} for i in range(n)]


# (file name, Karpathy "filepath", split, photo or None for a corrupt file, number of captions)
IMAGES = [
    ("cat.jpg", "", "train", "chelsea", 6),
    ("broken.jpg", "", "train", None, 5),
    ("cup.jpg", "val2014", "val", "coffee", 5),
    ("my astronaut.png", "", "restval", "astronaut", 5),
    ("rocket.jpg", "", "train", "rocket", 3),
    ("camera.png", "", "train", "camera", 5),
    ("cat again.png", "val2014", "test", "chelsea", 5),
]


@pytest.fixture(scope="module")
def ssd():
    return SsdEfficientNetExtractor()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    images = root / "images"
    entries = []
    for filename, filepath, split, photo, n_captions in IMAGES:
        (images / filepath).mkdir(parents=True, exist_ok=True)
        path = images / filepath / filename
        if photo is None:
            path.write_bytes(b"\xff\xd8\xff\xe0 this JPEG ends right here")
        else:
            Image.fromarray(getattr(data, photo)()).save(path)
        entry = {"filename": filename, "split": split, "sentences": captions(filename, n_captions)}
        entries.append({**entry, "filepath": filepath} if filepath else entry)
    karpathy = root / "dataset.json"
    karpathy.write_text(json.dumps({"images": entries}))
    return images, karpathy


def run(dataset, ssd, out, **kwargs):
    images, karpathy = dataset
    return extract_dataset(read_records(karpathy), images, out, ssd, batch_size=2, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(dataset, ssd, tmp_path_factory):
    """All splits extracted in one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    run(dataset, ssd, out)
    return out


def output_files(out: Path, split: str = "") -> dict[str, bytes]:
    """The bytes of extractor.json and of every output file of ``split`` (all splits by default)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name == EXTRACTOR_FILE or p.name.startswith(split) and not p.name.endswith("_progress.json")}


def test_reads_karpathy_csv_and_jsonl(dataset, tmp_path):
    records = read_records(dataset[1])
    assert [r.split for r in records] == ["train", "train", "dev", "train", "train", "train", "test"]
    assert records[2].image == "val2014/cup.jpg"
    assert records[0].captions[0] == "caption 0 of the cat.jpg photo", "one line per caption"

    rows = [("a.jpg", "a dog", "test"), ("b.jpg", "a cat", ""), ("a.jpg", "  ", "test"), ("a.jpg", "the dog", "test")]
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    (tmp_path / "caps.jsonl").write_text("".join(
        json.dumps({"image": i, "caption": c, **({"split": s} if s else {})}) + "\n" for i, c, s in rows))
    expected = [ImageRecord("a.jpg", "test", ("a dog", "the dog")), ImageRecord("b.jpg", "dev", ("a cat",))]
    assert read_records(tmp_path / "caps.csv", default_split="dev") == expected
    assert read_records(tmp_path / "caps.jsonl", default_split="dev") == expected

    (tmp_path / "bad.csv").write_text("picture,text\nx.jpg,hello\n")
    with pytest.raises(ExtractError, match="lacks the 'image' or 'caption'"):
        read_records(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "x.jpg"}]}')
    with pytest.raises(ExtractError, match="Karpathy"):
        read_records(tmp_path / "bad.json")
    with pytest.raises(ExtractError, match="does not exist"):
        read_records(tmp_path / "nothing.json")


def test_cli_end_to_end(dataset, ssd, reference, tmp_path, capsys):
    images, karpathy = dataset
    out = tmp_path / "out"
    assert main(["--images", str(images), "--captions", str(karpathy), "--out", str(out), "--batch-size", "2"]) == 0
    stderr = capsys.readouterr().err
    assert "skipping broken.jpg" in stderr and "skipping rocket.jpg: 3 captions, 5 needed" in stderr
    assert output_files(out) == output_files(reference)


def test_output_files(dataset, ssd, reference):
    images, _ = dataset
    out = reference
    train = load_split(out, "train")  # the reader training uses
    rows = load_image_rows(out, "train")  # and a gallery index
    assert train.features.shape == (3, K, 1280) and rows.boxes.shape == (3, K, 4)
    assert (out / "train_ids.txt").read_text().split() == ["cat.jpg", "my%20astronaut.png", "camera.png"]
    assert rows.ids == ["cat.jpg", "my astronaut.png", "camera.png"], "input order, no holes, unquoted"
    assert all((images / name).is_file() for name in rows.ids), "an id finds its image again"
    assert train.captions[:6] == [f"caption {i} of the cat.jpg photo" for i in range(5)] + [
        "caption 0 of the my astronaut.png photo"]
    assert len(train.captions) == 15, "the cat's 6th caption is dropped"
    assert train.extractor == ssd.identity
    skipped = (out / "train_skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["broken.jpg", "rocket.jpg"]
    assert "truncated or corrupt" in skipped[0]

    for row, name in enumerate(["cat.jpg", "my astronaut.png", "camera.png"]):
        expected = ssd.extract(images / name)
        np.testing.assert_allclose(train.features[row], expected.features, atol=1e-4)
        np.testing.assert_allclose(rows.boxes[row], expected.boxes, atol=1e-3)
    assert load_image_rows(out, "dev").ids == ["val2014/cup.jpg"]
    assert load_split(out, "test").features.shape == (1, K, 1280)
    assert not (out / "dev_skipped.txt").read_text()


def test_resume_after_crash_is_identical_to_an_uninterrupted_run(dataset, ssd, reference, tmp_path, monkeypatch):
    calls, crashes = [], []
    real_extract_batch = ssd.extract_batch

    def crash_on_second_batch(images, batch_size=8):
        calls.append(len(images))
        if len(calls) == 2 and not crashes:
            crashes.append(len(images))
            raise RuntimeError("simulated crash")
        return real_extract_batch(images, batch_size)

    monkeypatch.setattr(ssd, "extract_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(dataset, ssd, tmp_path / "resumed", splits=["train"])
    progress = json.loads((tmp_path / "resumed" / "train_progress.json").read_text())
    assert (progress["inputs_done"], progress["rows"], progress["complete"]) == (2, 1, False)

    calls.clear()
    run(dataset, ssd, tmp_path / "resumed", splits=["train"])
    assert calls == [1, 1], "only the two unfinished batches run again"
    assert output_files(tmp_path / "resumed") == output_files(reference, "train")


def test_crash_between_data_and_progress_writes_no_duplicates(dataset, ssd, reference, tmp_path, monkeypatch):
    saves = []
    real_write = extract.atomic_write_json

    def crash_on_second_save(path, state, **kwargs):
        if path.name.endswith("_progress.json"):
            saves.append(state["inputs_done"])
            if len(saves) == 2:
                raise KeyboardInterrupt  # the batch's rows and lines are on disk, its progress is not
        real_write(path, state, **kwargs)

    monkeypatch.setattr(extract, "atomic_write_json", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, ssd, tmp_path / "resumed", splits=["train"])
    monkeypatch.undo()
    assert len((tmp_path / "resumed" / "train_caps.txt").read_text().splitlines()) == 10
    run(dataset, ssd, tmp_path / "resumed", splits=["train"])
    assert output_files(tmp_path / "resumed") == output_files(reference, "train")


def test_finished_and_foreign_outputs(dataset, ssd, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(dataset, ssd, out, splits=["dev"])
    monkeypatch.setattr(ssd, "extract_batch", lambda *a, **k: pytest.fail("a finished split ran again"))
    assert run(dataset, ssd, out, splits=["dev"])[0].written == 1
    monkeypatch.undo()

    images, _ = dataset
    other = [ImageRecord("cup.jpg", "dev", ("a cup",) * 5)]
    with pytest.raises(ExtractError, match="--restart"):
        extract_dataset(other, images / "val2014", out, ssd, show_progress=False)
    extract_dataset(other, images / "val2014", out, ssd, restart=True, show_progress=False)
    assert (out / "dev_caps.txt").read_text() == "a cup\n" * 5

    identity = json.loads((out / "extractor.json").read_text())
    (out / "extractor.json").write_text(json.dumps({**identity, "num_regions": 10}))
    with pytest.raises(ExtractError, match="another region extractor"):
        run(dataset, ssd, out, splits=["dev"])
    with pytest.raises(ExtractError, match=r"no images for split\(s\) \['val'\]"):
        run(dataset, ssd, tmp_path / "fresh", splits=["val"])
