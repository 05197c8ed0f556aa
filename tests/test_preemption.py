"""SIGTERM is a preemption notice: commit at the next batch boundary, exit 75, lose no step."""

import json
import random
import re
import signal
import subprocess
import sys
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


# A main thread busy in one long C call that releases the GIL and never checks for signals (as a
# compiled training step does): Python cannot run a signal handler until the call returns.
BUSY_SCRIPT = """
import hashlib, json, signal, sys, time
from cluster_trainer.preemption import PreemptionWatcher

def busy(seconds):
    started = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"p", b"s", 20_000)
    rounds = int(20_000 * seconds / (time.perf_counter() - started))
    print("busy", flush=True)
    started = time.monotonic()
    hashlib.pbkdf2_hmac("sha256", b"p", b"s", rounds)
    return started, time.monotonic()

watcher = PreemptionWatcher(grace_seconds=30)
watcher.start()
started, ended = busy(3.0)  # calibrated on a short call: on a loaded machine the long one can take half as long
report = {"source": watcher.notice.source, "received": watcher.notice.received_at - started, "busy": ended - started}
try:
    print("noticed", flush=True)
    time.sleep(1.5)  # a second SIGINT ends this at once
    report["second"] = "ignored"
except KeyboardInterrupt:
    report["second"] = "KeyboardInterrupt"
watcher.stop()
print(json.dumps(report), flush=True)
"""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_long_step_is_timed_from_its_arrival_not_from_the_step_end(number):
    process = subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "busy"
        time.sleep(0.2)
        process.send_signal(number)
        assert process.stdout.readline().strip() == "noticed"
        process.send_signal(number)
        report = json.loads(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
    assert report["source"] == signal.Signals(number).name
    assert report["busy"] > 1.0, report  # the call did keep the main thread busy
    assert report["received"] < report["busy"] - 0.5, f"the notice was timed at the end of the step: {report}"
    # Only a second Ctrl-C stops at once: the first one's notice, recorded by the wakeup thread before
    # the handler ran, must not count as an earlier one.
    assert report["second"] == ("KeyboardInterrupt" if number == signal.SIGINT else "ignored"), report


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


@pytest.mark.slow
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path):
    storage = tmp_path / "run"
    process, log = start_training(storage, CT_TEST_STEP_SLEEP="0.05")
    try:
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "Current thread" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        dump = log.read_text()
        assert "Current thread" in dump and dump.count("Thread 0x") >= 2, dump[-3000:]  # main and the writer, at least
        assert "in _train_epoch" in dump, dump[-3000:]  # the training thread, in the loop
        assert process.poll() is None, "SIGUSR1 stopped the run"
        process.send_signal(signal.SIGTERM)  # and it still answers a notice as before
        assert process.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    finally:
        process.kill()
        process.wait()
