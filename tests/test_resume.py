"""The first promise: a run killed anywhere and resumed ends bitwise equal to an uninterrupted one.

Each test runs the seed MLP job (EarlyStopping, ModelCheckpoint,
ReduceLROnPlateau) on MirroredStrategy over 2 logical CPU devices with op
determinism, in real subprocesses, kills it with SIGKILL at an exact point
right after a checkpoint, starts it again, and compares every tensor and every
piece of run state with the uninterrupted reference run. The interrupted runs
checkpoint every step while the reference uses the job's own policy (every 8
steps), so the comparison also shows that checkpointing never perturbs training.
"""

import random
import signal
import subprocess
import sys
import time

import pytest

from cluster_trainer.checkpoint import CheckpointStore
from cluster_trainer.storage import Storage
from harness import assert_bitwise_equal_runs, cli, cli_env, latest, run_and_kill_at, train_cmd, ROOT

STEPS_PER_EPOCH = 16  # jobs/mlp.py: 1024 examples, global batch 64

# name -> (where the process is parked when killed, the position it must resume from)
INTERRUPTION_POINTS = {
    "at_epoch_boundary": ("epoch_begin:16", {"epoch": 1, "batch": 0, "global_step": 16}),
    "after_first_batch_of_epoch": ("train_batch_begin:17", {"epoch": 1, "batch": 1, "global_step": 17}),
    "mid_epoch": ("train_batch_begin:24", {"epoch": 1, "batch": 8, "global_step": 24}),
    "before_last_batch_of_epoch": ("train_batch_begin:31", {"epoch": 1, "batch": 15, "global_step": 31}),
    "between_training_and_validation": ("test_begin:32", {"epoch": 1, "batch": 16, "global_step": 32}),
}


def test_reference_run_exercises_every_stateful_callback(mlp_reference):
    """Guard against a vacuous comparison: the run must stop early and reduce the LR."""
    state = latest(mlp_reference).state
    callbacks = state["callbacks"]
    early_stopping = callbacks["00-EarlyStopping"]
    assert early_stopping["stopped_epoch"] > 0, "EarlyStopping never stopped the reference run"
    assert state["position"]["stop_training"] and state["position"]["finished"]
    learning_rates = callbacks["04-History"]["history"]["learning_rate"]
    assert len(set(learning_rates)) > 1, "ReduceLROnPlateau never reduced the learning rate"
    assert callbacks["01-ModelCheckpoint"]["best"] == min(callbacks["04-History"]["history"]["val_loss"])
    # Interruptions below are in epoch 1 of a run that lasts several epochs more.
    assert len(callbacks["04-History"]["epoch"]) > 3


# Every point on local disk. On the object stores, where what differs is the storage layer and not
# the loop, one each of the two points whose commits differ most: mid-epoch on S3 (a step checkpoint)
# and between training and validation on GCS (the epoch's train logs travel in the checkpoint). Each
# store case costs about a minute of the suite's 2 cores; the stores' layers are also exercised by
# test_storage_faults.py (S3, with faults) and test_trust.py (both).
CASES = [(point, "local") for point in INTERRUPTION_POINTS] + [
    ("mid_epoch", "s3"), ("between_training_and_validation", "gcs"),
]


@pytest.mark.slow
@pytest.mark.parametrize("point, store", CASES, ids=[f"{store}-{point}" for point, store in CASES])
def test_resume_after_sigkill_is_bitwise_equal(point, store, request, mlp_reference, tmp_path):
    """On local disk, on a real S3 server and on a real GCS emulator."""
    pause_at, expected_position = INTERRUPTION_POINTS[point]
    storage = str(tmp_path / "run") if store == "local" else request.getfixturevalue(store).uri()
    run_and_kill_at(storage, pause_at, tmp_path, CT_TEST_EVERY_STEPS="1", expect=expected_position)

    killed = latest(storage)
    assert {k: killed.state["position"][k] for k in expected_position} == expected_position

    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1")
    assert resumed.returncode == 0, resumed.stderr
    p = expected_position
    assert f"epoch {p['epoch'] + 1}, batch {p['batch']} (global step {p['global_step']}), attempt 2" in resumed.stderr

    final = latest(storage)
    assert final.attempt == 2
    assert_bitwise_equal_runs(latest(mlp_reference), final)


@pytest.mark.slow
def test_several_interruptions_in_one_run_are_bitwise_equal(mlp_reference, tmp_path):
    """Three kills at exact points (mid-epoch, before validation, at an epoch boundary),
    one at a random moment (possibly mid-write), each resumed."""
    storage = tmp_path / "run"
    for pause_at, expected in (
        ("train_batch_begin:5", {"epoch": 0, "batch": 5}),
        ("test_begin:48", {"epoch": 2, "batch": 16}),
        ("epoch_begin:80", {"epoch": 5, "batch": 0}),
    ):
        run_and_kill_at(storage, pause_at, tmp_path, CT_TEST_EVERY_STEPS="1", expect=expected)

    # A kill at an arbitrary moment, once the run is committing again.
    store = CheckpointStore(Storage(str(storage)))
    before = store.committed()[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster_trainer", *train_cmd(storage)],
        env=cli_env(CT_TEST_EVERY_STEPS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 180
        while store.committed()[0] == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(20261124).uniform(0.0, 0.3))
    finally:  # never leave a training process behind, whatever failed
        process.send_signal(signal.SIGKILL)
        process.wait()

    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1")
    assert resumed.returncode == 0, resumed.stderr
    final = latest(storage)
    assert final.attempt == 5
    assert_bitwise_equal_runs(latest(mlp_reference), final)


@pytest.mark.slow
def test_finished_run_is_not_trained_again(mlp_reference, copy_of):
    storage = copy_of(mlp_reference)
    before = latest(storage)
    again = cli(*train_cmd(storage))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr
    assert latest(storage).name == before.name
