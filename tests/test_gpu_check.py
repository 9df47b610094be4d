"""benchmarks.gpu_check in its smoke mode: the GPU check still runs and its CPU-vs-device checks pass
(here the device is the CPU, so this pins the script's wiring, not CUDA's numbers)."""

from benchmarks.gpu_check import main


def test_smoke_mode_runs_every_measurement_and_check(capsys):
    assert main(["--smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in ("butd_images_per_s", "butd_features_diff", "butd_boxes_diff", "t2i_train_pairs_per_s",
                "i2t_train_pairs_per_s", "t2i_score_pairs_per_s", "i2t_loss_diff", "t2i_scores_diff"):
        assert key in out
    assert "all checks passed" in out
