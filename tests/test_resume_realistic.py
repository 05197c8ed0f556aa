"""Realistic jobs killed with SIGKILL and resumed on 2 replicas end bitwise equal to their uninterrupted runs.

Two jobs a Keras user writes (in tests/jobs/), each run through the CLI on
MirroredStrategy over 2 logical CPU devices:

- `augmented_cnn`: RandomFlip/RandomRotation/RandomZoom with seeds, Conv2D ->
  BatchNormalization -> Dropout, AdamW on a CosineDecay schedule. Each replica
  keeps its own copy of BatchNormalization's moving statistics; before they were
  stored per replica, validation after a resume differed from the uninterrupted
  run (val_loss by 1e-4).
- `tfrecord_accumulation`: a TFRecord builder TensorFlow cannot count,
  EarlyStopping on the training loss, AdamW with gradient accumulation. Before,
  such an epoch reported no training loss (EarlyStopping never fired), and
  accumulation failed inside the step under MirroredStrategy.
"""

import pytest

from harness import assert_bitwise_equal_runs, cli, latest, run_and_kill_at, train_cmd

pytestmark = pytest.mark.slow  # each test runs three training processes


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """Where the TFRecord job writes its records (once, on first import), shared by its runs."""
    return tmp_path_factory.mktemp("records")


def uninterrupted(tmp_path_factory, name: str, **env) -> str:
    storage = tmp_path_factory.mktemp(f"{name}-reference") / "run"
    result = cli(*train_cmd(storage), CT_TEST_JOB=name, **env)
    assert result.returncode == 0, result.stderr
    return storage


def test_cnn_with_batchnorm_augmentation_and_cosine_decay_resumes_bitwise_on_2_replicas(tmp_path, tmp_path_factory):
    reference = uninterrupted(tmp_path_factory, "augmented_cnn")
    # The copies of the moving statistics really differ between the replicas (else this proves nothing).
    per_replica = {e["stable_path"] for e in latest(reference).state["variables"] if e.get("replicas")}
    assert {"sequential/batch_normalization/moving_mean", "sequential/batch_normalization/moving_variance"} <= per_replica

    storage = tmp_path / "run"
    run_and_kill_at(storage, "train_batch_begin:12", tmp_path, expect={"epoch": 1, "batch": 4}, CT_TEST_JOB="augmented_cnn")
    resumed = cli(*train_cmd(storage), CT_TEST_JOB="augmented_cnn")
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2, batch 4 (global step 12), attempt 2" in resumed.stderr
    assert_bitwise_equal_runs(latest(reference), latest(storage))


def test_tfrecord_epochs_of_unknown_length_with_early_stopping_on_loss_and_gradient_accumulation_resume_bitwise(
        records_dir, tmp_path, tmp_path_factory):
    env = {"CT_TEST_JOB": "tfrecord_accumulation", "CT_TEST_DATA_DIR": str(records_dir)}
    reference = uninterrupted(tmp_path_factory, "tfrecord_accumulation", CT_TEST_DATA_DIR=str(records_dir))
    state = latest(reference).state
    history = state["callbacks"]["02-History"]["history"]
    assert len(history["loss"]) == len(history["accuracy"]) == 4, history  # every epoch reports its training metrics
    assert state["callbacks"]["00-EarlyStopping"]["stopped_epoch"] == 3 and state["position"]["stop_training"]

    storage = tmp_path / "run"
    # Step 14: in the middle of an accumulation of 3 (updates after steps 12 and 15), in the second epoch.
    run_and_kill_at(storage, "train_batch_begin:14", tmp_path, expect={"epoch": 1, "batch": 4},
                    CT_TEST_EVERY_STEPS="1", **env)
    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1", **env)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2, batch 4 (global step 14), attempt 2" in resumed.stderr
    assert_bitwise_equal_runs(latest(reference), latest(storage))
