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


def resumed_at(position: dict, attempt: int) -> str:
    """The line an attempt prints when it resumes at `position`."""
    return (f"epoch {position['epoch'] + 1}, batch {position['batch']} (global step {position['global_step']}), "
            f"attempt {attempt}")


@pytest.mark.slow
def test_a_run_killed_at_every_kind_of_point_resumes_each_time_at_the_next_batch_and_ends_bitwise_equal(
        mlp_reference, tmp_path):
    """One run on local disk, killed at every point in turn (each attempt resumes from the kill before it and
    is killed at the next point), then once at a random moment (possibly mid-write), then resumed to the end."""
    storage = tmp_path / "run"
    points = [("train_batch_begin:5", {"epoch": 0, "batch": 5, "global_step": 5}), *INTERRUPTION_POINTS.values(),
              ("epoch_begin:80", {"epoch": 5, "batch": 0, "global_step": 80})]
    previous = None
    for attempt, (pause_at, expected) in enumerate(points, start=1):
        output = run_and_kill_at(storage, pause_at, tmp_path, CT_TEST_EVERY_STEPS="1", expect=expected)
        if previous is not None:
            assert resumed_at(previous, attempt) in output, output[-3000:]
        killed = latest(storage)
        assert {k: killed.state["position"][k] for k in expected} == expected
        previous = expected

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
    assert final.attempt == len(points) + 2
    assert_bitwise_equal_runs(latest(mlp_reference), final)


# On the object stores, where what differs is the storage layer and not the loop, one each of the two
# points whose commits differ most: mid-epoch on S3 (a step checkpoint) and between training and
# validation on GCS (the epoch's train logs travel in the checkpoint). The stores' layers are also
# exercised by test_storage_faults.py (S3, with faults) and test_trust.py (both).
CASES = [("mid_epoch", "s3"), ("between_training_and_validation", "gcs")]


@pytest.mark.slow
@pytest.mark.parametrize("point, store", CASES, ids=[f"{store}-{point}" for point, store in CASES])
def test_resume_after_sigkill_on_an_object_store_is_bitwise_equal(point, store, request, mlp_reference, tmp_path):
    """On a real S3 server and on a real GCS emulator."""
    pause_at, expected_position = INTERRUPTION_POINTS[point]
    storage = request.getfixturevalue(store).uri()
    run_and_kill_at(storage, pause_at, tmp_path, CT_TEST_EVERY_STEPS="1", expect=expected_position)

    killed = latest(storage)
    assert {k: killed.state["position"][k] for k in expected_position} == expected_position

    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed_at(expected_position, 2) in resumed.stderr

    final = latest(storage)
    assert final.attempt == 2
    assert_bitwise_equal_runs(latest(mlp_reference), final)


@pytest.mark.slow
def test_finished_run_is_not_trained_again(mlp_reference, copy_of):
    storage = copy_of(mlp_reference)
    before = latest(storage)
    again = cli(*train_cmd(storage))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr
    assert latest(storage).name == before.name
