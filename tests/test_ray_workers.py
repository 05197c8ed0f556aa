"""One run on several Ray nodes (`--workers 2`), on a real local Ray cluster: a drained node, a worker
killed without notice, a driver stopped and a run resumed when only one node is free,
`ray job submit`, and a sweep whose trials each train on two nodes.

One cluster for the module, started by the first test that asks for it and stopped by PID
(`ray_cluster.py`): three nodes on 127.0.0.1, a head and two raylets with 1 CPU each, so a group of
two workers (1 CPU each, one per node) leaves a node free for the next group. A test that kills a
node leaves the cluster short; the next test adds a fresh raylet first (`nodes`): never while a
run trains, because a raylet took minutes to start on this shared machine under load, and once
timed out.

The uninterrupted 2-worker run that the others are compared with bit for bit is the session's
`two_workers` (conftest.py): the same two workers started without Ray, trained once for this module and
tests/test_multi_worker.py (a group Ray places trains the same bits; the `ray job submit` test checks it).
The run is the test job for 2 epochs (32
steps, a commit every 8) on 1 logical CPU device per worker; steps are slowed on every node
(`CT_TEST_STEP_SLEEP`, the nodes' own environment) so a test can act mid-epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

import cluster_trainer as ct
from cluster_trainer.chaos import compare_histories
from cluster_trainer.sweep import read_trials
from cluster_trainer.sweep_seal import KEY_FILE_ENV
from harness import ROOT, TEST_JOB, Driver, assert_bitwise_equal_runs, cli_env, latest, wait_until
from ray_cluster import RayCluster, _alive
from workers_harness import WORKERS_EPOCHS

pytestmark = pytest.mark.slow

EPOCHS = int(WORKERS_EPOCHS[1])  # as the session's `two_workers` reference
STEPS = 16 * EPOCHS
STEP_SLEEP = "0.2"  # 16 steps of >= 0.2 s: an epoch lasts at least 3 s on every node
EXIT_PREEMPTED = 75


NODE_ENV = {"CT_TEST_STEP_SLEEP": STEP_SLEEP}


@pytest.fixture(scope="module")
def cluster():
    with RayCluster() as running:
        running.start_head(num_cpus=1, env=NODE_ENV)
        yield running


def nodes(cluster, count: int = 3) -> list:
    """The cluster's live nodes, after adding fresh raylets until there are `count`."""
    alive = [n for n in cluster.nodes if n.process.poll() is None]
    while len(alive) < count:
        alive.append(cluster.add_node(num_cpus=1, env=NODE_ENV))
    return alive


def run_cmd(cluster, storage, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cluster_trainer", "run", TEST_JOB, "--storage", str(storage), "--devices", "1",
            "--epochs", str(EPOCHS), "--workers", "2", "--ray-address", cluster.address, *extra]


def committed(storage) -> dict:
    """The newest commit's position (`{}` before the first)."""
    try:
        return latest(storage).state["position"]
    except AssertionError:
        return {}


def start_run(cluster, storage, log, *extra: str) -> tuple[Driver, dict[int, tuple[str, int]]]:
    """A 2-worker run's driver, once its first group trains on two nodes, and that group's workers."""
    nodes(cluster)
    driver = Driver(run_cmd(cluster, storage, *extra), log, cli_env(**cluster.env))
    try:
        driver.wait_for(r"group 1: 2 workers at ")
    except BaseException:
        driver.stop()
        raise
    return driver, worker_pids(driver, 1)


def worker_pids(driver: Driver, group: int) -> dict[int, tuple[str, int]]:
    """{worker index: (node id prefix, pid)} of `group`, from the driver's lines."""
    found = re.findall(rf"group {group} worker (\d) running on node (\w+) \([^)]*pid (\d+)\)", driver.output())
    return {int(i): (node, int(pid)) for i, node, pid in found}


def node_of(cluster, prefix: str):
    return next(n for n in cluster.nodes if n.node_id.startswith(prefix))


def flush_position(driver: Driver) -> tuple[int, int, int]:
    """(epoch, batch, global step) of the chief's commit on a notice, from its log line (Ray forwards an
    actor's lines asynchronously: it may come after the driver's own)."""
    flush = driver.wait_for(r"worker 0: preemption notice \(.*?\): committing at epoch (\d+), batch (\d+) "
                            r"\(global step (\d+)\)")
    return tuple(int(g) for g in flush.groups())


def assert_equal_histories(reference, storage) -> None:
    differences, _, _ = compare_histories(str(reference), str(storage))
    assert not differences, differences


# -- ray job submit ---------------------------------------------------------------------------------


def test_ray_job_submit_of_a_two_worker_run_succeeds_with_one_writer_and_trains_what_workers_without_ray_train(
        cluster, two_workers, tmp_path):
    from ray.job_submission import JobSubmissionClient

    nodes(cluster)
    storage = tmp_path / "run"
    submission_id = f"ct-workers-{uuid.uuid4().hex[:8]}"
    excludes = json.dumps({"excludes": [".git", ".venv", "runs"]})
    job = os.path.relpath(TEST_JOB, ROOT)
    result = cluster.ray("job", "submit", f"--address={cluster.dashboard}", f"--submission-id={submission_id}",
                         "--working-dir=.", f"--runtime-env-json={excludes}", "--", "cluster-trainer", "run", job,
                         "--storage", str(storage), "--devices", "1", "--epochs", str(EPOCHS), "--workers", "2",
                         cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    client = JobSubmissionClient(cluster.dashboard)
    info, logs = client.get_job_info(submission_id), client.get_job_logs(submission_id)
    assert (info.status, info.driver_exit_code) == ("SUCCEEDED", 0)
    placed = set(re.findall(r"group 1 worker [01] running on node (\w+)", logs))
    assert len(placed) == 2, logs[-4000:]  # one worker per node
    assert re.search(r"group 1: 2 workers at [\d.]+:\d+, [\d.]+:\d+; worker 0 is the chief", logs), logs
    assert re.search(rf"run completed: {storage} \(epoch {EPOCHS}, global step {STEPS}, attempt 1; 1 Ray worker "
                     r"group\(s\) \(2 workers\), 0 preempted, 0 failed\) .*val_loss=", logs), logs[-3000:]
    checkpoint = latest(storage)
    assert checkpoint.state["position"]["finished"] and checkpoint.attempt == 1  # the chief alone registered
    assert sorted(p.name for p in (storage / "attempts").iterdir()) == ["a000001.json"]
    # The group Ray placed trained the same bits as the same two workers started by hand with TF_CONFIG.
    assert_bitwise_equal_runs(latest(two_workers[0]), checkpoint)
    assert_equal_histories(two_workers[0], storage)


# -- a drained node --------------------------------------------------------------------------------


def test_a_drained_worker_node_stops_the_whole_group_after_one_step_and_a_new_group_ends_bitwise_equal(
        cluster, two_workers, tmp_path):
    started = time.monotonic()
    storage = tmp_path / "run"
    driver, pids = start_run(cluster, storage, tmp_path / "driver.log")
    # Worker 1's node (then the chief must be told), unless it is the head: killing that would end the cluster.
    index = 1 if not node_of(cluster, pids[1][0]).head else 0
    drained = node_of(cluster, pids[index][0])
    try:
        # After the end of epoch 1 is committed (after its validation; the step-16 commit comes before
        # it), so the drain lands while epoch 2 trains: 16 steps of >= 0.2 s each.
        wait_until(lambda: committed(storage).get("epoch", 0) >= 1, "the commit at the end of epoch 1")
        cluster.drain(drained, deadline_seconds=60)
        driver.wait_for(r"group 1 preempted")
        epoch, batch, step = flush_position(driver)
        position = latest(storage).state["position"]
        # Zero steps lost: the chief committed exactly where every worker stopped, mid-epoch.
        assert (position["epoch"] + 1, position["batch"], position["global_step"]) == (epoch, batch, step)
        assert 0 < batch < 16, f"the drain did not land mid-epoch: epoch {epoch}, batch {batch}"
        drained.kill()  # the machine goes away; group 2 trains on the other two nodes
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
        drained.kill()  # whatever failed: a node left draining would take no worker in the next test
    output = driver.output()
    # Both workers stopped after the same step. The drain reaches them by whichever comes first: the drained
    # worker's own poll, or the driver, which passes a drain it sees on to the other workers; a worker that
    # hears neither in time learns of the other's notice through the loop's agreement. Either way, one of
    # them names the drain of that node.
    stops = re.findall(r"worker (\d): preemption notice \((.*?)\): committing at .* \(global step (\d+)\)", output)
    assert {(w, int(s)) for w, _, s in stops} == {("0", step), ("1", step)}, stops
    assert any(f"Ray drain of node {drained.node_id[:8]}" in source for _, source, _ in stops), stops
    assert re.search(r"group 1 preempted: .*; starting group 2 \(1 preemption\(s\), no limit; 0 failure\(s\)", output)
    assert f"(global step {step}), attempt 2" in output
    assert drained.node_id[:8] not in "".join(re.findall(r"group 2 worker \d running on node \w+", output))
    assert "2 Ray worker group(s) (2, 2 workers), 1 preempted, 0 failed" in output
    assert_bitwise_equal_runs(latest(two_workers[0]), latest(storage))
    assert_equal_histories(two_workers[0], storage)
    history = ct.read_history(str(storage))
    interrupted = epoch - 1  # 0-based, as the history counts
    assert history["attempt"].tolist() == [1] * interrupted + [2] * (EPOCHS - interrupted)
    assert history["resumed"].tolist() == [i == interrupted for i in range(EPOCHS)]
    print(f"drain test: {time.monotonic() - started:.0f}s")


# -- a worker killed without notice ------------------------------------------------------------------


def test_a_worker_killed_without_notice_tears_the_group_down_and_a_new_group_resumes_bitwise_equal(
        cluster, two_workers, tmp_path):
    started = time.monotonic()
    storage = tmp_path / "run"
    driver, pids = start_run(cluster, storage, tmp_path / "driver.log")
    try:
        wait_until(lambda: committed(storage).get("global_step", 0) >= 8, "the first commit")
        os.kill(pids[1][1], signal.SIGKILL)  # not the chief: it waits for worker 1 in the next all-reduce
        killed_at = time.monotonic()
        wait_until(lambda: not _alive(pids[1][1]), "the killed worker to die")
        failed = driver.wait_for(r"group 1 failed: worker 1 or its node \w+ died without notice")
        torn_down = time.monotonic() - killed_at
        wait_until(lambda: not _alive(pids[0][1]), "the chief to be stopped")
        last_commit = latest(storage)  # the next group starts after the backoff: nothing commits in between
        assert not last_commit.state["position"]["finished"], "the run finished before the kill; kill it earlier"
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    output = driver.output()
    assert torn_down < 60, f"the group was torn down {torn_down:.0f}s after the kill"
    assert re.search(r"; starting group 2 in 2s, resuming from the last committed checkpoint \(0 preemption\(s\), "
                     r"no limit; 1 failure\(s\), at most 3\)", output[failed.start():]), output[-3000:]
    p = last_commit.state["position"]
    assert f"from {last_commit.name}: epoch {p['epoch'] + 1}, batch {p['batch']} (global step {p['global_step']})" \
           in output
    assert "2 Ray worker group(s) (2, 2 workers), 0 preempted, 1 failed" in output
    assert_bitwise_equal_runs(latest(two_workers[0]), latest(storage))
    assert_equal_histories(two_workers[0], storage)
    print(f"SIGKILL test: {time.monotonic() - started:.0f}s, group torn down {torn_down:.1f}s after the kill")


# -- a stopped run resumed on fewer nodes -----------------------------------------------------------


def test_a_stopped_two_worker_run_resumes_on_one_worker_at_the_next_batch_when_only_one_node_is_free(
        cluster, tmp_path):
    started = time.monotonic()
    storage = tmp_path / "run"
    elastic = ("--min-workers", "1", "--shrink-after", "3")
    first, pids = start_run(cluster, storage, tmp_path / "first.log", *elastic)
    try:
        wait_until(lambda: committed(storage).get("global_step", 0) >= 16, "the commit at the end of epoch 1")
        first.process.send_signal(signal.SIGTERM)  # as `ray job stop` does
        assert first.finish() == EXIT_PREEMPTED, first.output()[-4000:]
    finally:
        first.stop()
    output = first.output()
    assert "SIGTERM: asking all 2 workers to commit at the next batch boundary and stop" in output
    epoch, batch, step = flush_position(first)
    position = latest(storage).state["position"]
    assert (position["epoch"] + 1, position["batch"], position["global_step"]) == (epoch, batch, step)
    assert re.search(r"stopped by SIGTERM: worker 0: preempted \(SIGTERM of the driver", output), output[-3000:]

    free, *busy = nodes(cluster)
    holds = [cluster.hold(node, num_cpus=1) for node in busy]  # other work takes all nodes but one
    try:
        second = Driver(run_cmd(cluster, storage, *elastic), tmp_path / "second.log", cli_env(**cluster.env))
        try:
            assert second.finish() == 0, second.output()[-4000:]
        finally:
            second.stop()
    finally:
        for hold in holds:
            hold.release()
    output = second.output()
    assert re.search(r"group 1: 2 nodes with CPU=1 were not free for \d+s \(--shrink-after\): starting with 1 "
                     r"worker\(s\) instead", output), output[-4000:]
    assert f"group 1 worker 0 running on node {free.node_id[:8]}" in output
    assert f"epoch {epoch}, batch {batch} (global step {step}), attempt 2" in output  # the exact next batch
    assert re.search(rf"run completed: .* \(epoch {EPOCHS}, global step {STEPS}, attempt 2\)", output), output[-3000:]
    assert latest(storage).state["replicas"] == 1
    print(f"elastic test: {time.monotonic() - started:.0f}s")


# -- a sweep whose trials span nodes ---------------------------------------------------------------


def test_a_sweep_on_two_workers_trains_each_trial_on_two_nodes_as_two_workers_train_without_ray(
        cluster, two_workers, tmp_path):
    nodes(cluster)
    storage = tmp_path / "sweep"
    command = [sys.executable, "-m", "cluster_trainer", "sweep", TEST_JOB, "--storage", str(storage), "--devices", "1",
               "--epochs", str(EPOCHS), "--workers", "2", "--ray-address", cluster.address,
               "--grid", "lr=0.01"]  # the job's own learning rate: the trial is the reference run
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=cli_env(**cluster.env, **{KEY_FILE_ENV: str(tmp_path / "sweep.key")}))
    output = result.stdout + result.stderr  # the trials' lines, as Ray forwards them to the driver
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"running up to \d+ trial\(s\) at once, .* per worker, 2 workers", output), output[-6000:]
    placed = set(re.findall(r"group 1 worker [01] running on node (\w+)", output))
    assert len(placed) == 2, output[-6000:]  # the trial's two workers, one per node
    table = read_trials(str(storage))
    assert list(table["status"]) == ["completed"] and list(table["epochs"]) == [EPOCHS], table.to_string()
    trial = latest(table["run_uri"].iloc[0])
    assert trial.state["replicas"] == 2 and trial.attempt == 1
    assert_bitwise_equal_runs(latest(two_workers[0]), trial)
    assert_equal_histories(two_workers[0], table["run_uri"].iloc[0])


# -- the group-restart benchmark -------------------------------------------------------------------


def test_group_restart_benchmark_runs_at_smallest_size(cluster):
    """Smoke test of `python -m bench --only group-restart` (not a measurement), on this module's cluster,
    which has the shape the benchmark needs: nodes with 1 CPU each, at least two."""
    nodes(cluster)
    result = subprocess.run([sys.executable, "-m", "bench", "--only", "group-restart", "--repeats", "1",
                             "--ray-address", cluster.address], cwd=ROOT, env=cli_env(**cluster.env),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 worker", "| 2 workers"))]
    assert len(rows) == 2, result.stdout
    for row in rows:  # every event came after the kill, the restart's in order (the resume line is forwarded
        seconds = [float(cell.split()[0]) for cell in row.split(" | ")[1:]]  # by Ray: it may arrive late)
        torn_down, placed, resumed, first_step = seconds
        # The table rounds to 0.1 s: a death Ray reports within 50 ms of the kill reads 0.0 (it did, for 1 worker).
        assert 0 <= torn_down <= placed <= first_step and resumed > placed, row
    assert re.search(r"Lost worker to first step, 2 workers / 1 worker: \d+\.\d\d×", result.stdout), result.stdout
