"""Sweeps on Ray Tune over a real local Ray cluster: every trial a run that survives interruption.

One cluster per module (a head with 2 CPUs, started and stopped by PID). Trials train the test
job (`tests/jobs/interruptible.py`: the seed MLP) for 3 epochs on 2 logical CPU devices; the
sweep driver is `cluster-trainer sweep` in a subprocess, so a test can kill it. Trials run in
warm workers (one training process trains trial after trial), so each test also checks that
reuse changes nothing. Every sweep's Ray Tune state is sealed with a key file of the test's own.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys

import pytest

from cluster_trainer.history import read_history
from cluster_trainer.storage import Storage
from cluster_trainer.sweep import make_searcher, parse_space, read_trials
from cluster_trainer.sweep_seal import KEY_FILE_ENV, MAX_STATE_FILE_BYTES, SweepStateError, TuneStateSeal, load_key
from harness import (ROOT, TEST_JOB, Driver, assert_bitwise_equal_runs, cli, cli_env, latest, train_cmd, tree_digest,
                     wait_until)
from ray_cluster import RayCluster

EPOCHS = "3"
GLOBAL_STATE_JOB = str(ROOT / "tests" / "jobs" / "global_state.py")


@pytest.fixture(scope="module")
def cluster():
    with RayCluster() as running:
        # Slow steps (on the node, where the training actors run), so a test can act mid-epoch.
        running.start_head(num_cpus=2, env={"CT_TEST_STEP_SLEEP": "0.05"}, dashboard=False)  # no `ray job submit` here
        yield running


def sweep_cmd(cluster, storage, *extra: str, job: str = TEST_JOB, epochs: str = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "cluster_trainer", "sweep", job, "--storage", str(storage),
            "--ray-address", cluster.address, "--devices", "2", "--epochs", epochs, *extra]


def sweep_env(cluster, tmp_path) -> dict:
    return cli_env(**cluster.env, **{KEY_FILE_ENV: str(tmp_path / "sweep.key")})


def finished(uri: str) -> bool:
    try:
        return latest(uri).state["position"]["finished"]
    except AssertionError:
        return False


@pytest.mark.slow
def test_a_grid_sweep_finishes_and_a_trial_killed_mid_epoch_resumes_bitwise_equal_to_its_twin(cluster, tmp_path):
    storage = tmp_path / "sweep"
    # Three trials, two at a time: one of the two training processes trains a second trial.
    driver = Driver(sweep_cmd(cluster, storage, "--grid", "lr=1e-2,3e-3,1e-3", "--max-concurrent", "2"),
                    tmp_path / "sweep.log", sweep_env(cluster, tmp_path))
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
    assert len(table) == 3 and set(table["status"]) == {"completed"}, table.to_string()
    assert sorted(table["config/lr"]) == [1e-3, 3e-3, 1e-2]
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
    config = [f"--set=lr={killed['config/lr']}"]
    result = cli(*train_cmd(twin, "--epochs", EPOCHS, *config))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal_runs(latest(twin), latest(run_uri))

    status = cli("sweep-status", str(storage), "--plot", str(tmp_path / "trials.png"))
    assert status.returncode == 0, status.stderr
    assert (tmp_path / "trials.png").stat().st_size > 10_000


def tune_state(storage) -> str:
    return "".join(path.read_text() for path in (storage / "tune").glob("experiment_state-*.json"))


def uploaded_whole(storage, key_file) -> bool:
    """Tune's state in storage is whole: every file a version the driver sealed. Tune uploads its state in
    place, in the background: a driver killed mid-upload leaves a file cut short, which the next driver puts
    back from the sealed copy if it is the newest version (the test below), and refuses otherwise. This test
    kills between uploads, so that what it checks does not depend on that moment."""
    try:
        TuneStateSeal(Storage(str(storage)), (key_file).read_bytes().strip()).verify()
        return True
    except (SweepStateError, OSError):
        return False


def latest_or_none(uri: str) -> int | None:
    try:
        return latest(uri).step
    except AssertionError:
        return None


@pytest.mark.slow
def test_a_sweep_driver_killed_midway_continues_and_finished_trials_are_not_run_again(cluster, tmp_path):
    # Optuna's TPE, seeded: the continued sweep proposes the third config from the searcher's restored state.
    storage = tmp_path / "sweep"
    space = ["--uniform", "lr=1e-3:3e-2"]
    command = sweep_cmd(cluster, storage, "--search", "optuna", *space, "--num-samples", "3", "--seed", "11",
                        "--max-concurrent", "1")
    first = Driver(command, tmp_path / "first.log", sweep_env(cluster, tmp_path))
    try:
        trial = first.wait_for(r"cluster-trainer \[(\w+)\]: actor 1 running").group(1)
        wait_until(lambda: finished(str(storage / trial)), f"trial {trial} to finish")
        running = first.wait_for(rf"cluster-trainer \[(?!{trial})(\w+)\]: actor 1 running on node \w+ \(.*?pid (\d+)\)")
        second, actor_pid = running.group(1), int(running.group(2))
        wait_until(lambda: (latest_or_none(str(storage / second)) or 0) > 0, f"trial {second} to commit")
        # A restore knows only the trials Tune's last saved state holds (it saves every 10 s or more); the
        # trial's process is frozen meanwhile, so that it is still mid-run when the driver dies.
        os.kill(actor_pid, signal.SIGSTOP)
        wait_until(lambda: second in tune_state(storage) and uploaded_whole(storage, tmp_path / "sweep.key"),
                   f"Tune's saved state to hold trial {second}")
        first.process.send_signal(signal.SIGKILL)  # the driver is gone; its trials' actors die with it
        first.process.wait()
    finally:
        first.stop()

    again = Driver(command, tmp_path / "again.log", sweep_env(cluster, tmp_path))
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
    # The searcher's state came back: the third trial got TPE's third proposal, not its first again.
    searcher = make_searcher("optuna", parse_space(uniform=space[1:]), "val_loss", "min", seed=11,
                             max_concurrent=None)  # a limit of 1 would hold back the next proposal
    proposed = [searcher.suggest(f"t{i}")["lr"] for i in range(3)]
    assert sorted(table["config/lr"]) == sorted(proposed), (table.to_string(), proposed)


@pytest.mark.slow
def test_a_trial_in_a_reused_worker_is_bitwise_equal_to_the_same_trial_in_a_fresh_process(cluster, tmp_path):
    # One trial at a time, in grid order, in one training process: a mixed-precision trial (which also sets Keras's
    # epsilon), a float64 one, each drawing from every global generator, then a float32 one.
    storage = tmp_path / "sweep"
    driver = Driver(sweep_cmd(cluster, storage, "--grid", "policy=mixed_float16,float64,float32",
                              "--max-concurrent", "1", "--set", "draws=1000", job=GLOBAL_STATE_JOB, epochs="1"),
                    tmp_path / "sweep.log", sweep_env(cluster, tmp_path))
    try:
        pattern = r"\(_trial pid=(\d+)\) cluster-trainer \[(\w+)\]: actor 1 running on node \w+ \([^)]*pid (\d+)"
        first = driver.wait_for(pattern)
        second = driver.wait_for(pattern.replace(r"\[(\w+)\]", rf"\[(?!{first.group(2)})(\w+)\]"))
        # Tune's trial process drives the trials and never loaded the job file: no TensorFlow mapped in it.
        trial_process = int(second.group(1))
        assert trial_process == int(first.group(1))
        with open(f"/proc/{trial_process}/maps") as maps:
            assert "tensorflow" not in maps.read()
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    workers = {trial: worker for _, trial, worker in re.findall(pattern, driver.output())}
    assert len(workers) == 3 and len(set(workers.values())) == 1, driver.output()[-4000:]  # one process, reused
    table = read_trials(str(storage)).set_index("config/policy")
    assert set(table["status"]) == {"completed"}, table.to_string()
    reused = table.loc["float32", "run_uri"]

    twin = tmp_path / "twin"
    result = cli(*train_cmd(twin, "--epochs", "1", "--set=policy=float32", "--set=draws=1000", job=GLOBAL_STATE_JOB))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal_runs(latest(twin), latest(reused))


@pytest.mark.slow
def test_asha_stops_poor_trials_early(cluster, tmp_path):
    storage = tmp_path / "sweep"
    # One at a time, in grid order: the good learning rate sets the bar, the hopeless ones miss it.
    driver = Driver(sweep_cmd(cluster, storage, "--grid", "lr=3e-2,1e-6,1e-2,1e-7", "--scheduler", "asha",
                              "--max-concurrent", "1"), tmp_path / "sweep.log", sweep_env(cluster, tmp_path))
    try:
        assert driver.finish() == 0, driver.output()[-4000:]
    finally:
        driver.stop()
    table = read_trials(str(storage)).set_index("config/lr")
    assert table.loc[3e-2, "status"] == "completed" and table.loc[3e-2, "epochs"] == 3, table.to_string()
    for hopeless in (1e-6, 1e-7):
        assert table.loc[hopeless, "status"] == "stopped early" and table.loc[hopeless, "epochs"] < 3, table.to_string()


@pytest.mark.parametrize("args, message", [
    # The keys need the job file, which imports TensorFlow; the rest is refused before that.
    pytest.param(["--grid", "nope=1,2"], "nope is not in the job's config (keys: lr, units)", marks=pytest.mark.slow),
    (["--grid", "lr="], "--grid expects KEY=VALUES, got 'lr='"),
    (["--uniform", "lr=0.5:0.1"], "the range for lr is empty: low 0.5 must be below high 0.1"),
    (["--loguniform", "lr=0:0.1"], "a log-uniform range for lr must be positive"),
    (["--uniform", "lr=a:b"], "--uniform lr expects LOW:HIGH numbers"),
    (["--search", "optuna", "--grid", "lr=1e-2,1e-3"],
     "--search optuna samples the space and cannot enumerate a grid (lr): give those values with --choice"),
    ([], "the search space is empty"),
])
def test_a_bad_space_is_a_one_line_error_before_anything_runs(args, message, tmp_path):
    storage = tmp_path / "sweep"
    result = cli("sweep", str(ROOT / "jobs" / "mlp.py"), "--storage", str(storage), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not storage.exists()  # nothing started, nothing written


def test_the_trial_function_and_what_it_imports_load_no_tensorflow():
    # Tune's trial process imports these and builds the trial's job; the job file is loaded only where it trains.
    code = """if True:
        import sys
        import ray.tune
        from cluster_trainer import sweep
        from cluster_trainer.history import read_history
        from cluster_trainer.on_ray import driver, pool
        job = sweep.trial_job({"job_path": "jobs/mlp.py", "job_fields": {"name": "mlp", "config": {"lr": 0.01}}},
                              {"lr": 0.001})
        assert job.config == {"lr": 0.001} and job.source_path.endswith("jobs/mlp.py")
        loaded = sorted(name for name in ("tensorflow", "keras") if name in sys.modules)
        assert not loaded, loaded
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_optuna_search_with_a_fixed_seed_proposes_the_same_first_configs_twice():
    space = parse_space(choice=["units=16,32,64"], loguniform=["lr=1e-4:1e-1"])

    def first_configs(seed: int) -> list[dict]:
        searcher = make_searcher("optuna", space, "val_loss", "min", seed=seed, max_concurrent=2)
        return [searcher.suggest(f"trial-{i}") for i in range(4)]

    assert first_configs(5) == first_configs(5)
    assert first_configs(5) != first_configs(6)


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _sealed_sweep(tmp_path, monkeypatch) -> tuple:
    """A sweep directory whose Tune state (a harmless tuner.pkl and experiment state) its driver sealed."""
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "sweep.key"))
    sweep = tmp_path / "sweep"
    (sweep / "tune").mkdir(parents=True)
    seal = TuneStateSeal(Storage(str(sweep)), load_key(create=True))
    for name, data in (("tuner.pkl", pickle.dumps({"harmless": True})), ("experiment_state-1.json", b"{}")):
        (sweep / "tune" / name).write_bytes(data)
        seal.record(f"tune/{name}", data)
    return sweep, seal


@pytest.mark.slow  # the CLI loads the job file, which imports TensorFlow
def test_a_sweep_whose_tuner_pkl_was_replaced_is_refused_in_one_line_and_never_unpickled(tmp_path, monkeypatch):
    sweep, seal = _sealed_sweep(tmp_path, monkeypatch)
    seal.verify()  # as its driver left it
    marker = tmp_path / "the-pickle-ran"
    (sweep / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    before = tree_digest(sweep)
    result = cli("sweep", str(ROOT / "jobs" / "mlp.py"), "--storage", str(sweep), "--grid", "lr=1e-2,1e-3",
                 **{KEY_FILE_ENV: str(tmp_path / "sweep.key")})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "tune/tuner.pkl" in result.stderr and "was not written by this sweep's driver" in result.stderr
    assert "Start the sweep again at a new --storage" in result.stderr
    assert not marker.exists()
    assert tree_digest(sweep) == before


@pytest.mark.parametrize("tamper, message", [
    ("searcher", "tune/searcher-state-1.pkl of the sweep"),
    ("trial error", "tune/_trial_1/error.pkl of the sweep"),
    ("unsealed", "is not sealed (tune-seal.json is missing"),
    ("another key", "was not written with this machine's sweep key"),
    ("oversized", "is larger than 256 MiB, more than any sweep"),
])
def test_tune_state_the_driver_did_not_seal_is_refused_before_it_is_read(tamper, message, tmp_path, monkeypatch):
    sweep, seal = _sealed_sweep(tmp_path, monkeypatch)
    marker = tmp_path / "the-pickle-ran"
    if tamper == "searcher":
        (sweep / "tune" / "searcher-state-1.pkl").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    elif tamper == "trial error":
        (sweep / "tune" / "_trial_1").mkdir()
        (sweep / "tune" / "_trial_1" / "error.pkl").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    elif tamper == "unsealed":
        (sweep / "tune-seal.json").unlink()
    elif tamper == "oversized":  # a sparse file: refused by its size, never read whole
        with open(sweep / "tune" / "experiment_state-1.json", "wb") as f:
            f.truncate(MAX_STATE_FILE_BYTES + 1)
    else:
        (sweep / "tune-seal.json").unlink()
        TuneStateSeal(Storage(str(sweep)), b"another driver's key!").record("tune/tuner.pkl", b"")
    with pytest.raises(SweepStateError, match=re.escape(message)):
        TuneStateSeal(Storage(str(sweep)), load_key(create=False)).verify()
    assert not marker.exists()


def test_a_state_file_cut_short_by_a_driver_killed_mid_upload_is_put_back_and_any_other_content_refused(
        tmp_path, monkeypatch, caplog):
    # Tune uploads its files in place: a driver killed mid-upload to a local path leaves the start of one.
    sweep, seal = _sealed_sweep(tmp_path, monkeypatch)
    state = pickle.dumps({"searcher": list(range(1000))})
    seal.record("tune/searcher-state-1.pkl", state)
    (sweep / "tune" / "searcher-state-1.pkl").write_bytes(state[:len(state) // 3])
    TuneStateSeal(Storage(str(sweep)), load_key(create=False)).verify()
    assert (sweep / "tune" / "searcher-state-1.pkl").read_bytes() == state
    assert "tune/searcher-state-1.pkl of the sweep at" in caplog.text and "was cut short" in caplog.text
    # Not the start of the sealed version (nor a copy the seal names): refused as before, nothing written.
    marker = tmp_path / "the-pickle-ran"
    (sweep / "tune" / "searcher-state-1.pkl").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    (sweep / "tune-sealed" / "tune" / "searcher-state-1.pkl").write_bytes(state + b"appended")
    before = tree_digest(sweep)
    with pytest.raises(SweepStateError, match=re.escape("tune/searcher-state-1.pkl of the sweep")):
        TuneStateSeal(Storage(str(sweep)), load_key(create=False)).verify()
    assert tree_digest(sweep) == before and not marker.exists()
