"""Sweeps on Ray Tune over a real local Ray cluster: every trial a run that survives interruption.

One cluster per module (a head with 2 CPUs, started and stopped by PID). Trials train the test
job (`tests/jobs/interruptible.py`: the seed MLP) for 3 epochs on 2 logical CPU devices; the
sweep driver is `cluster-trainer sweep` in a subprocess, so a test can kill it.
"""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest

from cluster_trainer.history import read_history
from cluster_trainer.sweep import read_trials
from harness import ROOT, TEST_JOB, Driver, assert_bitwise_equal_runs, cli, cli_env, latest, train_cmd, wait_until
from ray_cluster import RayCluster

EPOCHS = "3"


@pytest.fixture(scope="module")
def cluster():
    with RayCluster() as running:
        # Slow steps (on the node, where the training actors run), so a test can act mid-epoch.
        running.start_head(num_cpus=2, env={"CT_TEST_STEP_SLEEP": "0.05"})
        yield running


def sweep_cmd(cluster, storage, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cluster_trainer", "sweep", TEST_JOB, "--storage", str(storage),
            "--ray-address", cluster.address, "--devices", "2", "--epochs", EPOCHS, *extra]


def finished(uri: str) -> bool:
    try:
        return latest(uri).state["position"]["finished"]
    except AssertionError:
        return False


@pytest.mark.slow
def test_a_grid_sweep_finishes_and_a_trial_killed_mid_epoch_resumes_bitwise_equal_to_its_twin(cluster, tmp_path):
    storage = tmp_path / "sweep"
    driver = Driver(sweep_cmd(cluster, storage, "--grid", "lr=1e-2,3e-3", "--grid", "units=16,32",
                              "--max-concurrent", "2"), tmp_path / "sweep.log", cli_env(**cluster.env))
    try:
        started = driver.wait_for(r"cluster-trainer \[(\w+)\]: actor 1 running on node \w+ \([^)]*pid (\d+)")
        trial_id, pid = started.group(1), int(started.group(2))
        run_uri = str(storage / trial_id)
        # After the commit at step 24 (every 8 steps): epoch 1, batch 8. Then kill it, mid-epoch, without notice.
        wait_until(lambda: (latest_or_none(run_uri) or 0) >= 24, f"trial {trial_id} committing step 24")
        os.kill(pid, signal.SIGKILL)
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    output = driver.output()
    assert re.search(rf"cluster-trainer \[{trial_id}\]: actor 1 failed: the actor or its node died", output), output[-4000:]

    table = read_trials(str(storage))
    assert len(table) == 4 and set(table["status"]) == {"completed"}, table.to_string()
    grid = sorted(zip(table["config/lr"], table["config/units"]))
    assert grid == sorted([(1e-2, 16), (1e-2, 32), (3e-3, 16), (3e-3, 32)])
    for _, trial in table.iterrows():
        history = read_history(trial["run_uri"])
        assert list(history["epoch"]) == [0, 1, 2]  # each epoch once, whatever happened
        assert trial["best_val_loss"] == history["val_loss"].min()
        assert trial["best_epoch"] == history["epoch"][history["val_loss"].idxmin()]
        assert trial["epochs"] == 3 and trial["run_uri"] == str(storage / trial["trial_id"])
    killed = table[table["trial_id"] == trial_id].iloc[0]
    assert killed["attempts"] == 2 and killed["interruptions"] == 1
    assert set(table[table["trial_id"] != trial_id]["attempts"]) == {1}
    # One attempt boundary, not a restart from epoch 0: the first epoch(s) by attempt 1, the rest by 2.
    history = read_history(run_uri)
    boundary = list(history["attempt"]).index(2)
    assert list(history["attempt"]) == [1] * boundary + [2] * (3 - boundary) and boundary >= 1, history

    twin = tmp_path / "twin"
    config = [f"--set=lr={killed['config/lr']}", f"--set=units={killed['config/units']}"]
    result = cli(*train_cmd(twin, "--epochs", EPOCHS, *config))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal_runs(latest(twin), latest(run_uri))

    status = cli("sweep-status", str(storage), "--plot", str(tmp_path / "trials.png"))
    assert status.returncode == 0, status.stderr
    assert (tmp_path / "trials.png").stat().st_size > 10_000


def latest_or_none(uri: str) -> int | None:
    try:
        return latest(uri).step
    except AssertionError:
        return None


@pytest.mark.slow
def test_a_sweep_driver_killed_midway_continues_and_finished_trials_are_not_run_again(cluster, tmp_path):
    storage = tmp_path / "sweep"
    command = sweep_cmd(cluster, storage, "--grid", "lr=1e-2,3e-3,1e-3", "--max-concurrent", "1")
    first = Driver(command, tmp_path / "first.log", cli_env(**cluster.env))
    try:
        trial = first.wait_for(r"cluster-trainer \[(\w+)\]: actor 1 running").group(1)
        wait_until(lambda: finished(str(storage / trial)), f"trial {trial} to finish")
        second = first.wait_for(rf"cluster-trainer \[(?!{trial})(\w+)\]: actor 1 running").group(1)
        wait_until(lambda: (latest_or_none(str(storage / second)) or 0) > 0, f"trial {second} to commit")
        first.process.send_signal(signal.SIGKILL)  # the driver is gone; its trials' actors die with it
        first.process.wait()
    finally:
        first.stop()

    again = Driver(command, tmp_path / "again.log", cli_env(**cluster.env))
    try:
        assert again.finish() == 0, again.output()[-4000:]
    finally:
        again.stop()
    assert "continuing the sweep" in again.output()
    table = read_trials(str(storage))
    assert len(table) == 3 and set(table["status"]) == {"completed"}, table.to_string()
    attempts = dict(zip(table["trial_id"], table["attempts"]))
    assert attempts[trial] == 1  # finished before the driver died: not trained again
    assert attempts[second] == 2  # resumed from its own checkpoint
    assert list(read_history(str(storage / second))["epoch"]) == [0, 1, 2]


@pytest.mark.slow
def test_asha_stops_poor_trials_early(cluster, tmp_path):
    storage = tmp_path / "sweep"
    # One at a time, in grid order: the good learning rate sets the bar, the hopeless ones miss it.
    driver = Driver(sweep_cmd(cluster, storage, "--grid", "lr=3e-2,1e-6,1e-2,1e-7", "--scheduler", "asha",
                              "--max-concurrent", "1"), tmp_path / "sweep.log", cli_env(**cluster.env))
    try:
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    table = read_trials(str(storage)).set_index("config/lr")
    assert table.loc[3e-2, "status"] == "completed" and table.loc[3e-2, "epochs"] == 3, table.to_string()
    for hopeless in (1e-6, 1e-7):
        assert table.loc[hopeless, "status"] == "stopped early" and table.loc[hopeless, "epochs"] < 3, table.to_string()


@pytest.mark.slow  # each loads the job file, which imports TensorFlow
@pytest.mark.parametrize("args, message", [
    (["--grid", "nope=1,2"], "nope is not in the job's config (keys: lr, units)"),
    (["--grid", "lr="], "--grid expects KEY=VALUES, got 'lr='"),
    (["--uniform", "lr=0.5:0.1"], "the range for lr is empty: low 0.5 must be below high 0.1"),
    (["--loguniform", "lr=0:0.1"], "a log-uniform range for lr must be positive"),
    (["--uniform", "lr=a:b"], "--uniform lr expects LOW:HIGH numbers"),
    ([], "the search space is empty"),
])
def test_a_bad_space_is_a_one_line_error_before_anything_runs(args, message, tmp_path):
    storage = tmp_path / "sweep"
    result = cli("sweep", str(ROOT / "jobs" / "mlp.py"), "--storage", str(storage), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not storage.exists()  # nothing started, nothing written
