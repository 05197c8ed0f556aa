"""One run on several workers (MultiWorkerMirroredStrategy), without Ray: real processes on 127.0.0.1.

Each worker is `cluster-trainer run --no-ray` with its own `TF_CONFIG` (as a Kubernetes pod
would have), one logical CPU device each, training the seed MLP job for 2 epochs. What a
2-worker run promises: it trains exactly what one process over 2 devices trains (the same
examples on each replica at every step, so the same bits); one writer (the chief); a notice on
any worker stops them all after the same step with the state committed; a worker killed
without notice fails the others in bounded time; and a run resumes on another replica count.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster_trainer.chaos import compare_histories
from harness import ROOT, assert_bitwise_equal_runs, cli_env, latest, once_per_session, tree_digest
from workers_harness import WORKERS_EPOCHS, WorkerGroup, run_command

EPOCHS = WORKERS_EPOCHS  # 32 steps: commits mid-epoch and at epoch ends, a notice mid-epoch; cheap on 2 cores
EXIT_PREEMPTED = 75
pytestmark = pytest.mark.slow  # every test trains in several processes


def one_process(storage, devices: int, *extra: str) -> subprocess.CompletedProcess:
    command = run_command(storage, devices, *EPOCHS, *extra)
    return subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def preempted(tmp_path_factory, worker_id) -> tuple[Path, list[str]]:
    """A 2-worker run stopped mid-epoch by SIGTERM to worker 1 alone: its storage and each worker's output."""

    def train(work: Path) -> dict:
        notice = {1: {"CT_TEST_NOTICE_AT": "train_batch_begin:20"}}
        with WorkerGroup(work / "run", work, *EPOCHS, worker_env=notice) as group:
            codes = group.wait()
        assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], group.outputs()
        return {"storage": str(work / "run"), "outputs": [group.output(i) for i in range(2)]}

    result = once_per_session(tmp_path_factory, worker_id, "preempted-two-workers", train)
    return Path(result["storage"]), result["outputs"]


def test_two_workers_train_bitwise_what_one_process_trains_on_as_many_devices(two_workers, tmp_path):
    """Same global batch, same replica count (2): every tensor, the callbacks and the history are equal."""
    storage, outputs = two_workers
    single = one_process(tmp_path / "single", 2)
    assert single.returncode == 0, single.stderr
    assert_bitwise_equal_runs(latest(tmp_path / "single"), latest(storage))
    differences, epochs, _ = compare_histories(str(tmp_path / "single"), str(storage))
    assert not differences and epochs == 2
    # One writer: the chief registered the only attempt; the other worker stored nothing of its own.
    assert [p.name for p in (storage / "attempts").iterdir()] == ["a000001.json"]
    final = latest(storage)
    assert final.state["replicas"] == 2 and final.state["replica_layout"] == "2 workers x 1 device"
    for output in outputs:
        assert f"run completed: {storage} (epoch 2, global step 32, attempt 1)" in output, output


def test_each_worker_feeds_its_replicas_what_one_process_feeds_them(tmp_path):
    """Step k gives every replica the examples MirroredStrategy gives it in one process, whatever
    the split into workers: full and partial last batches, replicas left with no example,
    batch sizes the replicas do not divide, structured examples."""
    script = textwrap.dedent("""
        import json
        import numpy as np
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
        from cluster_trainer.data import replica_batches

        def rows(batch):
            return (batch[0]["x"].numpy().tolist(), batch[1].numpy().tolist())

        checked = 0
        for replicas in (2, 3, 4):
            strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
            for examples, batch_size in ((74, 8), (70, 64)):
                data = tf.data.Dataset.from_tensor_slices(
                    ({"x": np.arange(examples)}, np.arange(examples) * 10)).batch(batch_size)
                one_process = []
                for batch in strategy.experimental_distribute_dataset(data):
                    parts = tf.nest.map_structure(strategy.experimental_local_results, batch)
                    one_process.append([rows(({"x": parts[0]["x"][r]}, parts[1][r])) for r in range(replicas)])
                for workers in [w for w in (1, 2, 3, 4) if replicas % w == 0]:
                    local = replicas // workers
                    for worker in range(workers):
                        ids = list(range(worker * local, (worker + 1) * local))
                        fed = [rows(part) for part in replica_batches(data, replicas, ids)]
                        expected = [step[r] for step in one_process for r in ids]
                        assert fed == expected, (replicas, examples, batch_size, workers, worker, fed, expected)
                        checked += 1
        print(json.dumps({"checked": checked}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"checked": 2 * (3 + 4 + 7)}


def test_sigterm_to_one_worker_stops_every_worker_after_the_same_step_with_the_state_committed(preempted):
    storage, outputs = preempted
    stops = [re.search(r"committing at epoch (\d+), batch (\d+) \(global step (\d+)\)", o) for o in outputs]
    assert all(stops), outputs
    epoch, batch, step = (int(g) for g in stops[0].groups())
    assert stops[1].groups() == stops[0].groups()  # every worker, after the same step
    assert 0 < batch < 16, "the notice was meant to land mid-epoch"
    committed = latest(storage)
    assert (committed.state["position"]["epoch"] + 1, committed.state["position"]["batch"]) == (epoch, batch)
    assert committed.step == step
    assert "preemption notice (SIGTERM on worker 1)" in outputs[1]
    assert "preemption notice (a notice on worker 1)" in outputs[0]
    for output in outputs:  # every worker says where the chief committed
        assert f"state committed as {committed.name} at global step {step}" in output, output


def test_the_group_resumed_after_a_notice_ends_bitwise_equal_to_the_uninterrupted_group(preempted, two_workers,
                                                                                        tmp_path):
    storage = tmp_path / "run"
    shutil.copytree(preempted[0], storage)
    stopped = latest(storage).state["position"]
    with WorkerGroup(storage, tmp_path, *EPOCHS, name="resumed") as group:
        codes = group.wait()
    assert codes == [0, 0], group.outputs()
    for i in range(2):
        assert (f"epoch {stopped['epoch'] + 1}, batch {stopped['batch']} (global step {stopped['global_step']}), "
                f"attempt 2") in group.output(i)
    assert_bitwise_equal_runs(latest(two_workers[0]), latest(storage))
    differences, epochs, _ = compare_histories(str(two_workers[0]), str(storage))
    assert not differences and epochs == 2


def test_a_run_preempted_on_two_workers_refuses_3_replicas_in_one_line_and_resumes_on_one_device_at_the_next_batch(
        preempted, tmp_path):
    storage = tmp_path / "run"
    shutil.copytree(preempted[0], storage)
    stopped = latest(storage).state["position"]
    before = tree_digest(storage)
    refused = one_process(storage, 3)  # 3 replicas do not divide the global batch of 64
    assert refused.returncode == 2, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("cluster-trainer: error:")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "the global batch size 64 does not split evenly over 3 replicas (3 devices)" in lines[0]
    assert "use workers x devices among 1, 2, 4, 8, 16, 32, 64" in lines[0]
    assert tree_digest(storage) == before  # nothing stored was touched

    resumed = one_process(storage, 1)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"epoch {stopped['epoch'] + 1}, batch {stopped['batch']} (global step {stopped['global_step']}), "
            "attempt 2") in resumed.stderr
    assert "the replica count changed from 2 (2 workers x 1 device) to 1 (1 device)" in resumed.stderr
    assert "bitwise equality with an uninterrupted run is promised only on the same replica count" in resumed.stderr
    final = latest(storage)
    assert final.state["position"]["finished"] and final.state["position"]["global_step"] == 32
    assert [row["epoch"] for row in final.state["history"]["epochs"]] == [0, 1]


def test_a_worker_killed_without_notice_fails_the_others_in_bounded_time(tmp_path):
    """No worker is left waiting forever in a collective: the chief, whose peer is gone, stops
    with one line within the coordination service's heartbeat timeout (about 10 s)."""
    storage = tmp_path / "run"
    with WorkerGroup(storage, tmp_path, *EPOCHS, CT_TEST_STEP_SLEEP="0.05") as group:
        deadline = time.monotonic() + 240
        while not (storage / "checkpoints").is_dir() or not any((storage / "checkpoints").iterdir()):
            assert time.monotonic() < deadline and group.processes[0].poll() is None, group.outputs()
            time.sleep(0.1)
        killed = group.signal(1, signal.SIGKILL)
        codes = group.wait(timeout=120)
    assert codes == [1, -signal.SIGKILL], group.outputs()
    waited = group.exited_at[0] - killed
    assert waited < 60, f"the chief took {waited:.0f}s to notice its peer was gone"
    errors = [line for line in group.output(0).splitlines() if line.startswith("cluster-trainer: error:")]
    assert len(errors) == 1 and "worker 0 lost the rest of its group" in errors[0], group.output(0)
    assert "start every worker again: the run resumes from its last commit" in errors[0]


@pytest.mark.parametrize("data", ["pydataset", "unknown"])
def test_two_workers_train_bitwise_what_one_process_trains_with_batch_norm_and_fit_s_other_data(data, tmp_path):
    """Beyond arrays: BatchNormalization, whose copies differ per replica, gathered from every worker
    into the checkpoint; a PyDataset with steps_per_epoch windows, validation_batch_size and
    every_steps="auto" (the chief's cadence, agreed through the step's votes); a tf.data builder of
    unknown length, whose epochs end where the data does on every worker at the same step."""
    env = {"CT_TEST_JOB": "fit_variants", "CT_TEST_DATA": data}
    single = subprocess.run(run_command(tmp_path / "single", 2), cwd=ROOT, env=cli_env(**env), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    with WorkerGroup(tmp_path / "group", tmp_path, **env) as group:
        codes = group.wait()
    assert codes == [0, 0], group.outputs()
    final = latest(tmp_path / "group")
    per_replica = [v["path"] for v in final.state["variables"] if v.get("replicas") == 2]
    assert any("batch_normalization" in path and "moving" in path for path in per_replica), per_replica
    assert_bitwise_equal_runs(latest(tmp_path / "single"), final)
