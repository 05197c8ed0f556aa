"""SIGTERM is a preemption notice: commit at the next batch boundary, exit 75, lose no step."""

import random
import re
import signal
import time

import pytest

from cluster_trainer.preemption import PreemptionWatcher
from harness import assert_bitwise_equal_runs, cli, latest, start_training, train_cmd

EXIT_PREEMPTED = 75


def test_the_first_notice_sets_the_deadline_and_a_second_does_not_move_it():
    watcher = PreemptionWatcher(grace_seconds=10)
    watcher.notify("SIGTERM")
    first = watcher.notice.deadline
    time.sleep(0.01)
    watcher.notify("SIGTERM")
    assert watcher.notice.deadline == first and 9 < watcher.notice.seconds_left() <= 10


@pytest.mark.slow
def test_sigterm_at_a_random_batch_commits_there_exits_75_and_resumes_with_no_step_rerun(mlp_reference, tmp_path):
    storage = tmp_path / "run"
    grace = 15.0
    process, log = start_training(storage, CLUSTER_TRAINER_GRACE_SECONDS=str(grace))
    try:
        time.sleep(random.Random(75).uniform(0.0, 1.0))
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        process.wait(timeout=grace + 30)
        took = time.monotonic() - sent
    finally:  # never leave a training process behind, whatever failed
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == EXIT_PREEMPTED, output
    assert took < grace, f"exited {took:.1f}s after SIGTERM, past the {grace}s grace period"

    committed = re.search(r"committing at epoch (\d+), batch (\d+) \(global step (\d+)\)", output)
    assert committed, output
    checkpoint = latest(storage)
    position = checkpoint.state["position"]
    # The commit is at the batch boundary where the process stopped: resuming re-runs no step.
    epoch, batch, step = (int(g) for g in committed.groups())
    assert (position["epoch"] + 1, position["batch"], position["global_step"]) == (epoch, batch, step)
    assert f"preempted (SIGTERM): state committed as {checkpoint.name} at global step {step}" in output

    resumed = cli(*train_cmd(storage))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(global step {step}), attempt 2" in resumed.stderr
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))
