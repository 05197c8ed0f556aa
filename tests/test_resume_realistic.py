"""A realistic CNN killed with SIGKILL and resumed on 2 replicas ends bitwise equal to its uninterrupted run.

The job (tests/jobs/realistic_cnn.py) is what a Keras user writes for images on
disk, run through the CLI on MirroredStrategy over 2 logical CPU devices: a
TFRecord builder TensorFlow cannot count, RandomFlip/RandomRotation/RandomZoom
with seeds, Conv2D -> BatchNormalization -> Dropout, AdamW on a CosineDecay
schedule with gradient accumulation, and EarlyStopping on the training loss.
Before this test, each of these broke a resume or the run: the epoch of
unknown length reported no training loss (EarlyStopping never fired),
accumulation failed inside the step under MirroredStrategy, and validation after
a resume differed from the uninterrupted run's (val_loss by 1e-4), because only
the first replica's copy of BatchNormalization's moving statistics was kept.
"""

import pytest

from harness import assert_bitwise_equal_runs, cli, latest, run_and_kill_at, train_cmd

pytestmark = pytest.mark.slow  # three training processes


def test_cnn_with_tfrecords_batchnorm_augmentation_schedule_and_accumulation_resumes_bitwise_on_2_replicas(
        tmp_path, tmp_path_factory):
    env = {"CT_TEST_JOB": "realistic_cnn", "CT_TEST_DATA_DIR": str(tmp_path_factory.mktemp("records"))}
    reference = tmp_path_factory.mktemp("realistic-reference") / "run"
    result = cli(*train_cmd(reference), **env)
    assert result.returncode == 0, result.stderr
    state = latest(reference).state
    # What makes the comparison mean something: every epoch reported its training metrics, EarlyStopping on
    # the loss stopped the run, and the replicas' copies of the moving statistics really differ.
    history = state["callbacks"]["02-History"]["history"]
    assert len(history["loss"]) == len(history["accuracy"]) == len(history["val_loss"]) == 4, history
    assert state["callbacks"]["00-EarlyStopping"]["stopped_epoch"] == 3 and state["position"]["stop_training"]
    per_replica = {e["stable_path"] for e in state["variables"] if e.get("replicas")}
    assert {"sequential/batch_normalization/moving_mean", "sequential/batch_normalization/moving_variance"} <= per_replica

    storage = tmp_path / "run"
    # Step 11: the second epoch's fourth batch, between two halves of an accumulated update.
    run_and_kill_at(storage, "train_batch_begin:11", tmp_path, expect={"epoch": 1, "batch": 3},
                    CT_TEST_EVERY_STEPS="1", **env)
    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1", **env)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2, batch 3 (global step 11), attempt 2" in resumed.stderr
    assert_bitwise_equal_runs(latest(reference), latest(storage))
