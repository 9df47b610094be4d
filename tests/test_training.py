"""Datasets, training (learning, exact resume, config handling), evaluation and the CLIs' errors.

Training runs on synthetic "concept" data (:mod:`training.synthetic`) written as precomp files here:
each image's regions include noisy prototypes of 3 of 12 concepts, and its captions name those
concepts, so a tiny model learns to retrieve within a hundred iterations on a CPU.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from adapt import AdaptConfig, AdaptModel, ConfigError, build_vocab
from training.config import load_config
from training.data import CaptionPairs, DatasetError, DistinctImageBatches, PairCollate, load_image_rows, load_split
from training.evaluate import evaluate, score_matrix
from training.evaluate import main as evaluate_main
from training.metrics import fold_slices, retrieval_metrics
from training.schedule import WarmupStepSchedule
from training.state import read_training_state
from training.synthetic import concept_images, concept_prototypes
from training.train import Trainer, build_model
from training.train import main as train_main

CONCEPTS = ["dog", "cat", "car", "tree", "boat", "horse", "bird", "ball", "child", "bike", "house", "river"]
TEMPLATES = ["a {} and a {} near a {}", "there is a {} with a {} and a {}", "{} , {} and {}",
             "a photo of a {} next to a {} and a {}", "the {} sees a {} by the {}"]
REGION_DIM, N_REGIONS = 32, 6
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation (and the test machine is shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_concept_dataset(root: Path, sizes=(("train", 80), ("dev", 20)), seed=0) -> Path:
    """Precomp files of synthetic concept images, 5 captions each; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # the order in which each caption names the concepts
    prototypes = concept_prototypes(len(CONCEPTS), REGION_DIM, seed)
    for index, (split, n) in enumerate(sizes):
        images = concept_images(n, prototypes, N_REGIONS, (seed, index))
        captions = [t.format(*[CONCEPTS[c] for c in rng.permutation(shown)])
                    for shown in images.concepts for t in TEMPLATES]
        np.save(root / f"{split}_ims.npy", images.features)
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return root


@pytest.fixture(scope="module")
def concept_data(tmp_path_factory) -> Path:
    return write_concept_dataset(tmp_path_factory.mktemp("concepts"))


def tiny_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"path": str(data), "name": "synthetic concepts", "val_max_images": None},
        "model": {"latent_size": 32, "word_vectors": "random", "word_dim": 16, "similarity": "t2i"},
        "optim": {"lr": 0.01, "warmup_iterations": 10, "decay_at": [200]},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 16, "epochs": 100, "val_every": 50,
                  "early_stop": 100, "progress": False},
    }))
    return path


# -- data ----------------------------------------------------------------------------------------


def test_precomp_files_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 3, 8)).astype(np.float32)
    boxes = rng.uniform(size=(4, 3, 4)).astype(np.float32)
    captions = [f"image {i} caption {j}" for i in range(4) for j in range(5)]
    captions[3] = "a caption with a line separator \u2028 and a carriage return \r inside"
    np.save(tmp_path / "test_ims.npy", features)
    np.save(tmp_path / "test_boxes.npy", boxes)
    (tmp_path / "test_caps.en.txt").write_bytes(("\r\n".join(captions) + "\r\n").encode())  # the reference's name
    (tmp_path / "test_ids.txt").write_text("a\nb\nc%20d.jpg\nd\n")  # as training.extract quotes a path
    identity = {"detector": "ssd-mobilenet-v2", "backbone": "efficientnet-lite0", "regions": 3}
    (tmp_path / "extractor.json").write_text(json.dumps(identity))

    split = load_split(tmp_path, "test")
    assert isinstance(split.features, np.memmap)  # not read into memory
    assert np.array_equal(split.features, features) and split.features.dtype == np.float32
    rows = load_image_rows(tmp_path, "test")
    assert np.array_equal(rows.features, features) and np.array_equal(rows.boxes, boxes)
    assert split.captions == captions and rows.ids == ["a", "b", "c d.jpg", "d"]
    assert split.extractor == identity
    assert (split.n_images, split.n_regions, split.region_dim, split.n_captions) == (4, 3, 8, 20)
    assert torch.equal(split.region_features([2, 0]), torch.from_numpy(features[[2, 0]]))
    part = split.images(1, 3)
    assert np.array_equal(part.features, features[1:3]) and part.captions == captions[5:15]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "dev_ims.npy").unlink(), "no region features for split 'dev'"),
    (lambda d: (d / "dev_caps.txt").unlink(), "expected dev_caps.txt or dev_caps.en.txt"),
    (lambda d: (d / "dev_caps.txt").write_text("one caption\n" * 7), "7 captions for the 3 images"),
    (lambda d: np.save(d / "dev_ims.npy", np.zeros((3, 8), np.float32)), "expected float features of shape"),
    (lambda d: np.save(d / "dev_boxes.npy", np.zeros((3, 2, 4))), "expected shape (3, 4, 4)"),
    (lambda d: (d / "dev_caps.txt").write_text("a cat\n" * 14 + "  \n"), "lines [15] have no words"),
    (lambda d: (d / "dev_ids.txt").write_text("1\n2\n"), "2 ids; expected one per image (3)"),
    (lambda d: (d / "extractor.json").write_text("{oops"), "extractor.json: not valid JSON"),
])
def test_dataset_errors_name_the_problem(tmp_path, damage, message):
    np.save(tmp_path / "dev_ims.npy", np.zeros((3, 4, 8), np.float32))
    (tmp_path / "dev_caps.txt").write_text("a cat\n" * 15)
    damage(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_split(tmp_path, "dev")
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(tmp_path / "missing", "dev")


def test_batches_never_hold_two_captions_of_one_image():
    sampler = DistinctImageBatches(n_images=23, captions_per_image=5, batch_size=8, seed=3)
    batches = sampler.epoch(0)
    assert len(batches) == len(sampler) == 15  # 5 rounds x (2 full + 1 of 7)
    for batch in batches:
        images = batch // 5
        assert len(set(images.tolist())) == len(batch)
    assert sorted(np.concatenate(batches).tolist()) == list(range(23 * 5))  # every caption once
    assert all(np.array_equal(a, b) for a, b in zip(batches, sampler.epoch(0), strict=True))  # reproducible
    assert not all(np.array_equal(a, b) for a, b in zip(batches, sampler.epoch(1), strict=True))
    assert len(DistinctImageBatches(17, 5, 8, 0).epoch(0)) == 10  # remainders of 1 pair are dropped


def test_collate_reads_rows_and_tokenizes(concept_data):
    split = load_split(concept_data, "dev")
    model = AdaptModel(AdaptConfig(region_dim=REGION_DIM, latent_size=8, vocab=build_vocab(split.captions),
                                   word_vectors="random", word_dim=4))
    pairs = CaptionPairs(split)
    batch = PairCollate(split, model.tokenize)([pairs[i] for i in (7, 0, 99)])
    assert batch.image_index.tolist() == [1, 0, 19]
    assert torch.equal(batch.features, torch.from_numpy(np.asarray(split.features[[1, 0, 19]])))
    assert torch.equal(batch.tokens.ids, model.tokenize([split.captions[i] for i in (7, 0, 99)]).ids)


def test_loader_workers_give_the_same_batches_as_the_main_process(tmp_path, concept_data):
    def epoch_batches(workers):
        folder = tmp_path / f"workers{workers}"
        folder.mkdir()
        trainer = Trainer(load_config(tiny_config(folder, concept_data), [f"train.workers={workers}"]))
        return list(trainer._loader(trainer.sampler.epoch(0)))

    in_process, in_worker = epoch_batches(0), epoch_batches(1)
    assert len(in_process) == len(in_worker) == 25
    for a, b in zip(in_process, in_worker, strict=True):
        assert torch.equal(a.features, b.features) and torch.equal(a.image_index, b.image_index)
        assert torch.equal(a.tokens.ids, b.tokens.ids) and torch.equal(a.tokens.mask, b.tokens.mask)


# -- schedule and config -------------------------------------------------------------------------


def test_schedule_follows_the_reference():
    schedule = WarmupStepSchedule(1e-3, 0.5, 2.0, 4000, (10000, 13000, 16000, 19000), 0.25)
    ramp = torch.linspace(0.5, 2.0, 4000)  # the reference's warm-up table
    for n in (0, 1, 1999, 3999):
        assert schedule.multiplier(n) == pytest.approx(ramp[n].item(), rel=1e-6)
    assert schedule.multiplier(4000) == schedule.multiplier(9999) == 2.0
    assert schedule.multiplier(10000) == schedule.multiplier(12999) == 0.5
    assert schedule.multiplier(13000) == 0.125
    assert schedule.lr_at(25000) == pytest.approx(1e-3 * 2.0 * 0.25**4)


def test_config_extends_overrides_and_rejects_unknown_keys(tmp_path):
    config = load_config(CONFIGS / "coco_i2t.yaml", ["optim.lr=1e-3", "train.max_iterations=7"])
    assert config.model["similarity"] == "i2t" and config.model["lambda_t2i"] == 5.0  # from coco_t2i
    assert config.optim.warmup_iterations == 16000 and config.optim.lr == 1e-3  # YAML reads 1e-3 as a string
    assert config.train.max_iterations == 7 and config.train.batch_size == 128
    f30k = load_config(CONFIGS / "f30k_t2i.yaml")
    assert f30k.train.batch_size == 105 and f30k.model["lambda_t2i"] == 10.0
    assert f30k.optim.decay_at == [10000, 13000, 16000, 19000]
    with pytest.raises(ConfigError, match=r"unknown keys \['train.batch'\]"):
        load_config(CONFIGS / "f30k_t2i.yaml", ["train.batch=3"])
    with pytest.raises(ConfigError, match="unknown model keys"):
        load_config(CONFIGS / "f30k_t2i.yaml", ["model.latent=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(CONFIGS / "f30k_t2i.yaml", ["train.batch_size=1.5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(CONFIGS / "f30k_t2i.yaml", ["batch_size=3"])


def test_model_is_built_from_the_config_and_the_data(tmp_path, concept_data):
    data = tmp_path / "with_extractor"
    data.mkdir()
    for name in ("train_ims.npy", "train_caps.txt"):
        (data / name).write_bytes((concept_data / name).read_bytes())
    identity = {"detector": "ssd-mobilenet-v2-coco", "regions": N_REGIONS}
    (data / "extractor.json").write_text(json.dumps(identity))
    split = load_split(data, "train")
    config = load_config(tiny_config(tmp_path, concept_data))
    model = build_model(config, split)
    assert model.config.extractor == identity and model.config.region_dim == REGION_DIM
    assert model.config.vocab == build_vocab(split.captions) and model.config.latent_size == 32
    with pytest.raises(ConfigError, match="model.region_dim=64 but the features"):
        build_model(load_config(tiny_config(tmp_path, concept_data), ["model.region_dim=64"]), split)


def test_the_bundled_recipes_concepts_options_reach_the_models_table(tmp_path, concept_data):
    # Features laid out as the bundled extractor writes them with --with-scene (1280 + 90 + 1000 + 5).
    data = tmp_path / "scene_feats"
    data.mkdir()
    n_images = len(np.load(concept_data / "train_ims.npy", mmap_mode="r"))
    np.save(data / "train_ims.npy", np.zeros((n_images, N_REGIONS, 2375), np.float32))
    (data / "train_caps.txt").write_bytes((concept_data / "train_caps.txt").read_bytes())
    config = load_config(CONFIGS / "scenes_concepts.yaml", [f"data.path={data}"])
    model = build_model(config, load_split(data, "train"))
    assert model.config.concepts["scene_weight"] == 0.5 and len(model.config.concepts["classes"]) == 1000
    assert model.region_encoder.n_scene == 1000 and model.region_encoder.scene_weight == 0.5


# -- training ------------------------------------------------------------------------------------


def test_training_lifts_rsum_far_above_chance(tmp_path, concept_data, capsys):
    config = tiny_config(tmp_path, concept_data)
    assert train_main(["--config", str(config), "train.max_iterations=100"]) == 0
    run = tmp_path / "run"
    val = (run / "val_log.csv").read_text().splitlines()
    assert len(val) == 3  # header + iterations 50, 100
    rsum = [float(line.split(",")[-2]) for line in val[1:]]
    # Chance on 20 images x 100 captions is about 150; the maximum is 600.
    assert max(rsum) > 450, rsum
    assert len((run / "train_log.csv").read_text().splitlines()) == 101
    assert (run / "training_curves.png").stat().st_size > 1000

    best = AdaptModel.from_pretrained(str(run / "best"))
    card = best.config.card
    assert card["validation"]["metrics"]["rsum"] == max(rsum)
    assert card["data"]["train_images"] == 80 and best.config.extractor is None
    assert (run / "best" / "README.md").read_text().startswith("---\n")

    # The evaluation CLI agrees with the validation done during training.
    out = tmp_path / "report.json"
    assert evaluate_main(["--checkpoint", str(run / "best"), "--data", str(concept_data), "--split", "dev",
                          "--json", str(out), "--markdown", str(tmp_path / "report.md")]) == 0
    report = json.loads(out.read_text())
    assert report["protocols"]["20 images"]["metrics"]["rsum"] == pytest.approx(max(rsum))
    assert "| 20 images |" in (tmp_path / "report.md").read_text()


def test_interrupt_and_resume_is_exact(tmp_path, concept_data):
    config = str(tiny_config(tmp_path, concept_data))
    common = ["train.val_every=10"]
    train_main(["--config", config, *common, "train.max_iterations=40", f"train.out_dir={tmp_path / 'whole'}"])
    # Pause between two validations (iteration 25, mid-epoch), then resume to the same length.
    train_main(["--config", config, *common, "train.max_iterations=25", f"train.out_dir={tmp_path / 'split'}"])
    assert read_training_state(tmp_path / "split")[1]["progress"]["iteration"] == 25
    train_main(["--config", config, *common, "train.max_iterations=40", f"train.out_dir={tmp_path / 'split'}",
                "--resume"])

    whole, whole_state = read_training_state(tmp_path / "whole")
    split, split_state = read_training_state(tmp_path / "split")
    assert whole.keys() == split.keys()
    different = [k for k in whole if not torch.equal(whole[k], split[k])]
    assert not different  # model, optimiser, loss iteration, RNG: bit-identical
    assert whole_state["progress"] == split_state["progress"]
    assert whole_state["optimizer"] == split_state["optimizer"]
    assert (tmp_path / "whole" / "val_log.csv").read_text() == (tmp_path / "split" / "val_log.csv").read_text()

    def losses(run):
        return [line.split(",")[:6] for line in (tmp_path / run / "train_log.csv").read_text().splitlines()]

    assert losses("whole") == losses("split")  # the rows logged after the pause were not duplicated
    assert (tmp_path / "whole" / "best" / "model.safetensors").read_bytes() == \
        (tmp_path / "split" / "best" / "model.safetensors").read_bytes()


def test_signal_pauses_after_the_current_iteration(tmp_path, concept_data, monkeypatch):
    config = load_config(tiny_config(tmp_path, concept_data), ["train.val_every=1000"])
    trainer = Trainer(config)
    step = trainer._step

    def step_then_signal(batch):
        row = step(batch)
        if row["iteration"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(trainer, "_step", step_then_signal)
    progress = trainer.fit()
    assert progress.iteration == 5 and progress.finished is None
    assert read_training_state(tmp_path / "run")[1]["progress"]["iteration"] == 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_early_stop_ends_the_run(tmp_path, concept_data, monkeypatch):
    import training.train as train_module

    rsums = iter([300.0, 300.0, 200.0, 250.0])  # a tie counts as an improvement, as in the reference
    metrics = {f"{d}_{m}": 0.0 for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")}
    monkeypatch.setattr(train_module, "retrieval_metrics", lambda *_: {**metrics, "rsum": next(rsums)})
    config = load_config(tiny_config(tmp_path, concept_data), ["train.val_every=5", "train.early_stop=2"])
    progress = Trainer(config).fit()
    assert progress.finished == "early_stop" and progress.iteration == 20
    assert (progress.best_rsum, progress.best_iteration, progress.bad_validations) == (300.0, 10, 2)
    best = [line.split(",")[-1] for line in (tmp_path / "run" / "val_log.csv").read_text().splitlines()[1:]]
    assert best == ["1", "1", "0", "0"]


def test_fresh_run_and_resume_refuse_what_would_go_wrong(tmp_path, concept_data, capsys):
    config = str(tiny_config(tmp_path, concept_data))
    train_main(["--config", config, "train.max_iterations=3"])
    with pytest.raises(SystemExit):
        train_main(["--config", config, "train.max_iterations=3"])
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--config", config, "model.latent_size=16", "--resume"])
    assert "model.latent_size: saved 32, now 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--config", config, f"train.out_dir={tmp_path / 'empty'}", "--resume"])
    assert "nothing to resume" in capsys.readouterr().err


def test_train_cli_errors_for_bad_data(tmp_path, concept_data, capsys):
    config = str(tiny_config(tmp_path, concept_data))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", config, f"data.path={tmp_path / 'nowhere'}"])
    assert exit_info.value.code == 2 and "nowhere does not exist" in capsys.readouterr().err
    broken = write_concept_dataset(tmp_path / "broken", sizes=(("train", 4), ("dev", 2)))
    (broken / "train_caps.txt").write_text("a dog\n" * 19)
    with pytest.raises(SystemExit):
        train_main(["--config", config, f"data.path={broken}"])
    err = capsys.readouterr().err
    assert "train_caps.txt: 19 captions for the 4 images of train_ims.npy; expected 5 per image = 20" in err
    with pytest.raises(SystemExit):
        train_main(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml does not exist" in capsys.readouterr().err


# -- training on several processes (torchrun, gloo on CPU) --------------------------------------

DDP_RUN = ["model.similarity=ensemble", "train.batch_size=15", "train.val_every=4", "train.device=cpu"]


def test_shards_of_a_global_batch_are_the_one_process_batch():
    one = DistinctImageBatches(n_images=23, captions_per_image=5, batch_size=8, seed=3).epoch(0)
    shards = [DistinctImageBatches(23, 5, 8, 3, rank, 2).epoch(0) for rank in range(2)]
    assert all(len(s) == len(one) for s in shards)
    for batch, first, second in zip(one, *shards, strict=True):
        assert np.array_equal(np.concatenate([first, second]), batch)
        assert abs(len(first) - len(second)) <= 1  # the round's last batch of 7: 4 + 3
    # A last batch too small to give each of 3 ranks a pair is dropped (23 = 2 x 10 + 3 keeps it).
    assert len(DistinctImageBatches(22, 5, 10, 0, 0, 3)) == 10 and len(DistinctImageBatches(23, 5, 10, 0, 0, 3)) == 15
    with pytest.raises(ValueError, match="at least the number of processes"):
        DistinctImageBatches(23, 5, 2, 0, 0, 3)


def torchrun(config: Path, *overrides: str) -> None:
    """``torchrun --nproc_per_node 2 -m training.train`` (gloo on CPU) in a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", "--config", str(config), *DDP_RUN, *overrides]
    out = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def train_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's train_log.csv, without their wall time."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((run / "train_log.csv").open())]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, concept_data) -> Path:
    """8 iterations of an ensemble on 2 processes, validating every 4; returns its out_dir."""
    folder = tmp_path_factory.mktemp("ddp")
    torchrun(tiny_config(folder, concept_data), "train.max_iterations=8", f"train.out_dir={folder / 'whole'}")
    return folder / "whole"


def test_two_processes_train_like_one_on_the_global_batch(tmp_path, concept_data, two_process_run):
    # Batches of 15 = shards of 8 + 7; the ensemble has two BatchNorms (regions and words) whose
    # statistics must be those of the whole batch.
    config = str(tiny_config(tmp_path, concept_data))
    assert train_main(["--config", config, *DDP_RUN, "train.max_iterations=8", f"train.out_dir={tmp_path / 'one'}"]) == 0
    one, two = train_rows(tmp_path / "one"), train_rows(two_process_run)
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-5)
    single, _ = read_training_state(tmp_path / "one")
    double, _ = read_training_state(two_process_run)
    each_rank = {"rng.rank0.torch", "rng.rank1.torch"}  # every rank's RNG, for an exact resume
    assert each_rank <= double.keys() and single.keys() == double.keys() - each_rank
    for key in (k for k in single if k.startswith(("model.", "optimizer.")) and single[k].is_floating_point()):
        torch.testing.assert_close(double[key], single[key], atol=1e-5, rtol=1e-5, msg=key)
    # Rank 0 alone wrote the logs and checkpoints: one row per iteration and validation.
    assert len((two_process_run / "val_log.csv").read_text().splitlines()) == 3
    assert (two_process_run / "best" / "model.safetensors").is_file()
    assert (two_process_run / "training_curves.png").is_file()


def test_resume_on_two_processes_is_exact(tmp_path, concept_data, two_process_run):
    config = tiny_config(tmp_path, concept_data)
    # Pause at iteration 6, between the validations at 4 and 8, then resume to 8.
    torchrun(config, "train.max_iterations=6", f"train.out_dir={tmp_path / 'split'}")
    torchrun(config, "train.max_iterations=8", f"train.out_dir={tmp_path / 'split'}", "--resume")
    whole, whole_state = read_training_state(two_process_run)
    split, split_state = read_training_state(tmp_path / "split")
    assert [k for k in whole if not torch.equal(whole[k], split[k])] == []
    assert whole_state["progress"] == split_state["progress"]
    assert train_rows(two_process_run) == train_rows(tmp_path / "split")
    assert (two_process_run / "val_log.csv").read_text() == (tmp_path / "split" / "val_log.csv").read_text()


# -- evaluation ----------------------------------------------------------------------------------


def random_model(split, similarity="t2i", seed=0):
    torch.manual_seed(seed)
    model = AdaptModel(AdaptConfig(region_dim=split.region_dim, latent_size=16, similarity=similarity,
                                   vocab=build_vocab(split.captions), word_vectors="random", word_dim=8))
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


def test_score_matrix_is_the_models_scores(concept_data, monkeypatch):
    import training.evaluate as ev

    split = load_split(concept_data, "dev")
    model = random_model(split, "ensemble")
    with torch.no_grad():
        direct = model(split.region_features(slice(None)), split.captions).scores
    monkeypatch.setattr(ev, "IMAGE_BATCH", 6)  # several image batches and caption chunks
    monkeypatch.setattr(ev, "CAPTION_BATCH", 17)
    chunked = score_matrix(model, split, progress=False)
    assert torch.allclose(chunked, direct, atol=1e-5)


def test_ensemble_and_folds(concept_data):
    split = load_split(concept_data, "dev")
    t2i, i2t = random_model(split, "t2i", 1), random_model(split, "i2t", 2)
    scores = (score_matrix(t2i, split, progress=False) + score_matrix(i2t, split, progress=False)) / 2
    report = evaluate([t2i, i2t], split, folds=(1, 5), progress=False)
    assert report["protocols"]["20 images"]["metrics"] == retrieval_metrics(scores)
    folds = report["protocols"]["5 folds of 4 images"]["folds"]
    assert folds == [retrieval_metrics(scores[i, c]) for i, c in fold_slices(20, 5)]
    # Without the whole-split protocol only the within-fold blocks are scored: same numbers.
    alone = evaluate([t2i, i2t], split, folds=(5,), progress=False)["protocols"]["5 folds of 4 images"]
    assert alone["metrics"] == pytest.approx(report["protocols"]["5 folds of 4 images"]["metrics"])


def test_evaluate_cli_errors(tmp_path, concept_data, capsys):
    split = load_split(concept_data, "dev")
    random_model(split).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "nope"), "--data", str(concept_data), "--split", "dev"])
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(concept_data), "--split", "test"])
    assert "no region features for split 'test'" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "dev_ims.npy", np.zeros((2, 3, 7), np.float32))
    (other / "dev_caps.txt").write_text("a dog\n" * 10)
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(other), "--split", "dev"])
    assert "features are 7-d but" in capsys.readouterr().err


def test_evaluate_refuses_features_of_another_extractor(tmp_path, concept_data, capsys):
    split = load_split(concept_data, "dev")
    model = random_model(split)
    model.config.extractor = {"detector": "ssd-mobilenet-v2-coco", "regions": N_REGIONS}
    model.save_pretrained(tmp_path / "ckpt")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("dev_ims.npy", "dev_caps.txt"):
        (other / name).write_bytes((concept_data / name).read_bytes())
    (other / "extractor.json").write_text(json.dumps({"detector": "faster-rcnn-vg", "regions": N_REGIONS}))
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(other), "--split", "dev"])
    err = capsys.readouterr().err
    assert "features come from extractor {'detector': 'faster-rcnn-vg'" in err
    assert f"but {tmp_path / 'ckpt'} was trained on features of {{'detector': 'ssd-mobilenet-v2-coco'" in err


def test_frozen_parameters_keep_their_start_and_unknown_prefixes_are_refused(tmp_path, concept_data):
    config = str(tiny_config(tmp_path, concept_data))
    frozen = ["optim.frozen=[region_encoder.fc,similarity.heads.t2i.adapt.fc_beta]"]
    train_main(["--config", config, *frozen, "train.max_iterations=5", "train.val_every=5"])
    start = dict(build_model(load_config(config, frozen), load_split(concept_data, "train")).named_parameters())
    trained = read_training_state(tmp_path / "run")[0]
    for name in ("region_encoder.fc.weight", "similarity.heads.t2i.adapt.fc_beta.weight"):
        assert torch.equal(next(v for k, v in trained.items() if k.endswith(name)), start[name].detach())
    gamma = "similarity.heads.t2i.adapt.fc_gamma.weight"
    assert not torch.equal(next(v for k, v in trained.items() if k.endswith(gamma)), start[gamma].detach())
    with pytest.raises(ConfigError, match="no parameter starts with"):
        Trainer(load_config(config, ["optim.frozen=[no_such_module]", f"train.out_dir={tmp_path / 'x'}"]))
