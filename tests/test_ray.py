"""The Ray runner on a real local Ray cluster (127.0.0.1): preemption by a drained node, an actor
killed without notice, `ray job submit`, and the embedded local Ray of the README's command.

One cluster per module (a head with 1 CPU, started by the test and stopped by PID, see
`ray_cluster.py`); the drain test adds a worker node and kills it. Under `pytest -n 2` each worker
that runs one of these tests starts its own cluster: ports and directories are private to each, so
they do not meet. (Grouping them on one worker with `--dist loadgroup` would save one start, but
loadgroup silently stops grouping on pytest 9.2 with pytest-xdist 3.8: pytest-xdist#1386.)

Placement in the drain test: the head's only CPU is held by an idle actor while the run starts,
so Ray must place the first actor on the worker node; after the worker is drained and killed, the
hold is released and the only node with room for the next actor is the head. Holding the head
(rather than a custom resource only the worker has) keeps the run's own resource request the
plain default, so the retry is free to go anywhere, as it would be on a real cluster.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness import ROOT, TEST_JOB, Driver, assert_bitwise_equal_runs, cli, cli_env, latest, wait_until
from ray_cluster import MARKER, RayCluster, _alive, _pids_in, _pids_with_marker

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def cluster():
    with RayCluster() as running:
        running.start_head(num_cpus=1)
        yield running


def driver_cmd(storage, *extra: str, job: str = TEST_JOB) -> list[str]:
    """The same run as the harness's `train_cmd`, on Ray."""
    return [sys.executable, "-m", "cluster_trainer", "run", job, "--storage", str(storage), "--devices", "2", *extra]


def committed_step(storage) -> int:
    try:
        return latest(storage).step
    except AssertionError:  # nothing committed yet
        return -1


def committed_epoch(storage) -> int:
    """Epochs finished in the newest commit (its position is the next batch to train)."""
    try:
        return latest(storage).state["position"]["epoch"]
    except AssertionError:  # nothing committed yet
        return -1


def history_of(storage):
    import cluster_trainer as ct

    return ct.read_history(str(storage))


# -- a drained node ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_drained_node_flushes_at_a_batch_boundary_and_the_run_finishes_on_another_node_bitwise_equal(
        cluster, mlp_reference, tmp_path):
    started = time.monotonic()
    head = cluster.nodes[0]
    # Steps are slowed on the worker only (its processes' environment), so the drain lands well
    # inside an epoch; the head trains at full speed.
    worker = cluster.add_node(num_cpus=1, env={"CT_TEST_STEP_SLEEP": "0.35"})
    storage = tmp_path / "run"
    hold = cluster.hold(head, num_cpus=1)
    driver = Driver(driver_cmd(storage, "--ray-address", cluster.address), tmp_path / "driver.log",
                    cli_env(**cluster.env))
    try:
        node = driver.wait_for(r"actor 1 running on node (\w+)")[1]
        assert worker.node_id.startswith(node), f"the first actor ran on {node}, not the worker {worker.node_id}"
        # The end of epoch 1 committed (after its validation; the step-16 commit comes before it), so
        # the drain arrives while epoch 2 trains: 16 steps of >= 0.35 s, a window of over 5 s.
        wait_until(lambda: committed_epoch(storage) >= 1, "the end of epoch 1 to be committed")
        cluster.drain(worker, deadline_seconds=30)
        driver.wait_for(r"actor 1 preempted")
        flush = driver.wait_for(r"preemption notice \(Ray drain of node \w+\): committing at epoch (\d+), batch (\d+) "
                                r"\(global step (\d+)\)")
        epoch, batch, step = (int(g) for g in flush.groups())
        checkpoint = latest(storage)
        position = checkpoint.state["position"]
        # Zero steps lost: the commit is exactly at the batch boundary where training stopped, mid-epoch.
        assert (position["epoch"] + 1, position["batch"], position["global_step"]) == (epoch, batch, step)
        assert 0 < batch < 16, f"the flush was not mid-epoch: {flush[0]}"
        assert re.search(rf"state committed as {checkpoint.name} at global step {step}, [\d.]+s after the notice "
                         r"\([\d.]+s before the deadline\)", driver.output())
        worker.kill()  # the machine goes away, mid-epoch 2 of the run
        # No node has room now (the head is held): the driver says what it waits for.
        driver.wait_for(r"actor 2 has waited \d+s for a node with CPU=1: ")
        hold.release()
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
        hold.release()
        worker.kill()
    output = driver.output()
    assert f"actor 2 running on node {head.node_id[:8]}" in output
    assert (f"resuming run 'mlp-test' at {storage} from {checkpoint.name}: epoch {epoch}, batch {batch} "
            f"(global step {step}), attempt 2") in output
    assert re.search(rf"run completed: {storage} \(epoch 9, global step 144, attempt 2; 2 Ray actor\(s\), "
                     r"1 preempted, 0 failed\) .*val_loss=", output), output[-2000:]
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))

    history = history_of(storage)
    interrupted = epoch - 1  # 0-based, as Keras and the history count
    assert history["epoch"].tolist() == list(range(9))
    assert history["attempt"].tolist() == [1] * interrupted + [2] * (9 - interrupted)
    assert history["resumed"].tolist() == [i == interrupted for i in range(9)]
    print(f"drain test: {time.monotonic() - started:.0f}s")


# -- an actor killed without notice ----------------------------------------------------------------


@pytest.mark.slow
def test_an_actor_killed_without_notice_is_replaced_and_resumes_from_the_last_commit(cluster, mlp_reference, tmp_path):
    started = time.monotonic()
    storage = tmp_path / "run"
    driver = Driver(driver_cmd(storage, "--ray-address", cluster.address), tmp_path / "driver.log",
                    cli_env(**cluster.env))
    try:
        pid = int(driver.wait_for(r"actor 1 running on node \w+ \([^)]*pid (\d+)\)")[1])
        wait_until(lambda: committed_step(storage) > 0, "the first commit")
        time.sleep(random.Random(5).uniform(0.0, 0.5))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), f"actor process {pid} to die")
        last_commit = latest(storage)  # the next actor starts seconds later: nothing can commit in between
        assert not last_commit.state["position"]["finished"], "the run finished before the kill; kill it earlier"
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    output = driver.output()
    assert re.search(r"actor 1 failed: the actor or its node died without notice .*; starting actor 2 in 2s, "
                     r"resuming from the last committed checkpoint \(0 preemption\(s\), no limit; 1 failure\(s\), "
                     r"at most 3\)", output), output[-3000:]
    p = last_commit.state["position"]
    assert (f"from {last_commit.name}: epoch {p['epoch'] + 1}, batch {p['batch']} (global step {p['global_step']}), "
            "attempt 2") in output
    assert "2 Ray actor(s), 0 preempted, 1 failed)" in output
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))
    print(f"SIGKILL test: {time.monotonic() - started:.0f}s")


@pytest.mark.slow
def test_a_run_that_fails_every_time_is_retried_with_backoff_then_given_up_with_exit_1(cluster, tmp_path):
    started = time.monotonic()
    job = tmp_path / "boom.py"
    job.write_text(
        "import dataclasses, keras\n"
        "import cluster_trainer as ct\n"
        f"base = ct.load_job({str(ROOT / 'jobs' / 'mlp.py')!r})\n"
        "class Boom(keras.callbacks.Callback):\n"
        "    def on_train_batch_end(self, batch, logs=None):\n"
        "        if batch == 3:\n"
        "            raise RuntimeError('boom at batch 3')\n"
        "job = dataclasses.replace(base, callbacks=lambda config, run: [*base.callbacks(config, run), Boom()])\n"
    )
    driver = Driver(driver_cmd(tmp_path / "run", "--ray-address", cluster.address, "--max-failures", "1",
                               job=str(job)), tmp_path / "driver.log", cli_env(**cluster.env))
    try:
        assert driver.finish() == 1, driver.output()[-4000:]
    finally:
        driver.stop()
    output = driver.output()
    assert "RuntimeError: boom at batch 3" in output and "Traceback" in output  # the actor's traceback, streamed
    assert re.search(r"actor 1 failed: RuntimeError: boom at batch 3; starting actor 2 in 2s", output), output[-3000:]
    assert re.search(r"error: actor 2 failed: RuntimeError: boom at batch 3; that is 2 failure\(s\), more than "
                     r"--max-failures 1: giving up", output), output[-3000:]
    assert "actor 3" not in output
    print(f"give-up test: {time.monotonic() - started:.0f}s")


# -- ray job submit --------------------------------------------------------------------------------


def submit(cluster, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` as docs/RAY.md shows it, from the repository root."""
    excludes = json.dumps({"excludes": [".git", ".venv", "runs"]})
    return cluster.ray("job", "submit", f"--address={cluster.dashboard}", f"--submission-id={submission_id}",
                       "--working-dir=.", f"--runtime-env-json={excludes}", "--", *entrypoint, cwd=ROOT)


def job_info(cluster, submission_id: str):
    """Status, exit code and logs of a submitted job, from Ray's job SDK (HTTP to the dashboard)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    return client.get_job_info(submission_id), client.get_job_logs(submission_id)


@pytest.mark.slow
def test_ray_job_submit_succeeds_streams_progress_and_rejects_a_reused_submission_id(cluster, tmp_path):
    started = time.monotonic()
    storage = tmp_path / "run"
    submission_id = f"ct-test-{uuid.uuid4().hex[:8]}"
    entrypoint = ("cluster-trainer", "run", "jobs/mlp.py", "--storage", str(storage), "--epochs", "2")
    first = submit(cluster, submission_id, *entrypoint)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    info, logs = job_info(cluster, submission_id)
    assert (info.status, info.driver_exit_code) == ("SUCCEEDED", 0)
    assert "connected to Ray at " in logs  # RAY_ADDRESS, set by the job, not a local Ray
    assert "starting a local Ray" not in logs
    assert "each actor loads jobs/mlp.py from its node's copy of Ray's working_dir" in logs
    assert re.search(r"\(TrainActor pid=\d+\) Epoch 2/2", logs), logs[-3000:]  # progress, one line per epoch
    assert re.search(r"\(TrainActor pid=\d+\) 16/16 - .* val_loss: ", logs), logs[-3000:]
    assert re.search(rf"run completed: {storage} \(epoch 2, global step 32, attempt 1\) .*val_loss=", logs), logs[-3000:]
    assert latest(storage).state["position"]["finished"]
    # What Ray uploaded: the job file and the package, not .git or what .gitignore lists.
    packages = [p for p in Path(cluster.root).glob("n0/session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert packages and all((p / "jobs" / "mlp.py").is_file() for p in packages), packages
    assert not any((p / ".git").exists() or (p / ".pytest_cache").exists() for p in packages)

    again = submit(cluster, submission_id, *entrypoint)  # an idempotency key: a CronJob's retry cannot run it twice
    assert again.returncode != 0
    assert "already exists" in again.stdout + again.stderr, again.stdout[-2000:] + again.stderr[-2000:]
    print(f"job submit test: {time.monotonic() - started:.0f}s")


@pytest.mark.slow
def test_ray_job_submit_of_a_failing_run_ends_failed_with_the_error_in_the_logs_and_no_retry(cluster, tmp_path):
    started = time.monotonic()
    submission_id = f"ct-test-{uuid.uuid4().hex[:8]}"
    # Bad input found inside the actor (the job asks for 0 devices): exit 2, never retried.
    result = submit(cluster, submission_id, "cluster-trainer", "run", "jobs/mlp.py", "--storage",
                    str(tmp_path / "run"), "--devices", "0")
    assert result.returncode != 0
    info, logs = job_info(cluster, submission_id)
    assert (info.status, info.driver_exit_code) == ("FAILED", EXIT_BAD_INPUT)
    assert "cluster-trainer: error: --devices must be >= 1, got 0" in logs, logs[-3000:]
    assert "actor 1 running" in logs and "actor 2" not in logs
    print(f"failing job submit test: {time.monotonic() - started:.0f}s")


# -- the embedded default ----------------------------------------------------------------------------


@pytest.mark.slow
def test_without_an_address_a_local_ray_runs_the_job_ctrl_c_commits_and_a_rerun_ends_bitwise_equal(
        mlp_reference, tmp_path):
    """The README's `cluster-trainer run jobs/mlp.py --storage runs/mlp`: no cluster, no flags."""
    started = time.monotonic()
    storage = tmp_path / "run"
    # The local Ray's processes inherit the driver's working directory and environment: by
    # either, none of them may outlive the driver.
    here = tmp_path / "cwd"
    here.mkdir()
    marker = uuid.uuid4().hex
    env = cli_env(RAY_AUTH_MODE="disabled", CT_TEST_STEP_SLEEP="0.05", **{MARKER: marker})
    env.pop("RAY_ADDRESS", None)

    def local_ray() -> list[int]:
        return [p for p in {*_pids_with_marker(marker), *_pids_in(here)} if _alive(p)]

    def assert_local_ray_stopped() -> None:
        """Ray's processes exit with their driver, though not in the same instant."""
        try:
            wait_until(lambda: not local_ray(), "the local Ray to stop with its driver", timeout=30)
        finally:
            for pid in local_ray():  # leave nothing running, whatever failed
                os.kill(pid, signal.SIGKILL)

    driver = Driver(driver_cmd(storage), tmp_path / "first.log", env, new_session=True, cwd=here)
    try:
        driver.wait_for(r"starting a local Ray on 127\.0\.0\.1")
        wait_until(lambda: committed_step(storage) > 0, "the first commit")
        # Every server of the local Ray (GCS, raylet, workers, agents) and the driver's: on loopback only.
        listening = listening_addresses([driver.process.pid, *local_ray()])
        assert listening and all(address.is_loopback for address in listening), listening
        os.killpg(driver.process.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        assert driver.finish() == EXIT_PREEMPTED, driver.output()[-4000:]
    finally:
        driver.stop()
        assert_local_ray_stopped()
    output = driver.output()
    flush = re.search(r"committing at epoch (\d+), batch (\d+) \(global step (\d+)\)", output)
    assert flush, output[-3000:]
    epoch, batch, step = (int(g) for g in flush.groups())
    checkpoint = latest(storage)
    assert (checkpoint.state["position"]["epoch"] + 1, checkpoint.state["position"]["batch"],
            checkpoint.state["position"]["global_step"]) == (epoch, batch, step)
    assert f"cluster-trainer: stopped by SIGINT: preempted (SIGINT of the driver): state committed as {checkpoint.name}" \
           in output

    env.pop("CT_TEST_STEP_SLEEP")
    rerun = Driver(driver_cmd(storage), tmp_path / "second.log", env, cwd=here)
    try:
        assert rerun.finish() == 0, rerun.output()[-4000:]
    finally:
        rerun.stop()
        assert_local_ray_stopped()
    assert f"(global step {step}), attempt 2" in rerun.output()
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))
    print(f"embedded Ray test: {time.monotonic() - started:.0f}s")


def listening_addresses(pids: list[int]) -> set:
    """The addresses the processes `pids` accept TCP connections on (IPv4-mapped IPv6 as IPv4), from /proc."""
    import ipaddress

    sockets = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone meanwhile
            continue
        sockets |= {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in sockets:  # LISTEN
                    raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host (little-endian) order
                    address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                    found.add(getattr(address, "ipv4_mapped", None) or address)
    return found


# -- bad input, before any Ray starts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--no-ray", "--ray-address", "127.0.0.1:1"], "--ray-address applies to runs on Ray: leave out --no-ray"),
        (["--no-ray", "--num-gpus", "1"], "--num-gpus applies to runs on Ray"),
        (["--resource", "spot"], "--resource expects KEY=NUMBER, e.g. spot_a100=1; got 'spot'"),
        (["--label-selector", "pool"], "--label-selector expects KEY=VALUE, e.g. pool=spot"),
        (["--num-gpus", "1.5"], "Resources.num_gpus must be a whole number, or a fraction below 1"),
        (["--max-failures", "-1"], "--max-failures must be an integer >= 0"),
        (["--notice", "azure"], "unknown notice source 'azure'"),
    ],
)
def test_bad_ray_options_are_one_line_and_exit_code_2(args, message, tmp_path):
    result = cli("run", str(ROOT / "jobs" / "mlp.py"), "--storage", str(tmp_path / "run"), *args)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cluster-trainer: error:"), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_unreachable_ray_address_is_bad_input_naming_the_fix(tmp_path):
    from ray_cluster import free_port

    result = cli("run", str(ROOT / "jobs" / "mlp.py"), "--storage", str(tmp_path / "run"),
                 "--ray-address", f"127.0.0.1:{free_port()}", RAY_AUTH_MODE="disabled")
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "cluster-trainer: error: cannot connect to Ray at 127.0.0.1:" in result.stderr
    assert "or pass --no-ray to train in this process" in result.stderr
