"""The CNN job: Dropout masks, a user callback's counter, TensorBoard steps and CSVLogger
rows continue across a SIGKILL exactly as in the uninterrupted run."""

import collections
from pathlib import Path

import pytest

from harness import assert_bitwise_equal_runs, cli, latest, once_per_session, run_and_kill_at, train_cmd

CNN = {"CT_TEST_JOB": "cnn"}


def scalar_events(log_dir: Path) -> collections.Counter:
    """(writer, tag, step, value) of every scalar summary in every event file below `log_dir`.

    Steps-per-second scalars are wall-clock measurements, different in every run: left out.
    """
    import tensorflow as tf

    events = collections.Counter()
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                if getattr(array, "ndim", 0) == 0 and array.dtype.kind == "f" and not value.tag.endswith("steps_per_second"):
                    events[(path.parent.name, value.tag, event.step, float(array))] += 1
    return events


@pytest.fixture(scope="module")
def cnn_reference(tmp_path_factory, worker_id):
    """The uninterrupted CNN run, trained once per session even when xdist sends the tests to two workers."""

    def train(work: Path) -> dict:
        result = cli(*train_cmd(work / "run"), **CNN)
        assert result.returncode == 0, result.stderr
        return {"storage": str(work / "run")}

    return Path(once_per_session(tmp_path_factory, worker_id, "cnn-reference", train)["storage"])


@pytest.mark.slow
def test_cnn_resume_mid_epoch_continues_dropout_counter_tensorboard_and_csv(cnn_reference, tmp_path):
    storage = tmp_path / "run"
    run_and_kill_at(storage, "train_batch_begin:40", tmp_path, CT_TEST_EVERY_STEPS="1",
                    expect={"epoch": 2, "batch": 8}, **CNN)
    killed = latest(storage)
    assert (killed.state["position"]["epoch"], killed.state["position"]["batch"]) == (2, 8)
    assert killed.state["callbacks"]["00-BatchLearningRate"]["counter"] == 40

    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1", **CNN)
    assert resumed.returncode == 0, resumed.stderr

    reference = latest(cnn_reference)
    final = latest(storage)
    assert_bitwise_equal_runs(reference, final)
    assert any(k.startswith("model/non_trainable/") for k in final.tensors), "Dropout's seed state was not captured"
    assert final.state["callbacks"]["00-BatchLearningRate"]["counter"] == 6 * 16

    # CSVLogger: one header, one row per epoch, byte for byte the uninterrupted file.
    csv = (storage / "files" / "history.csv").read_text()
    assert csv == (cnn_reference / "files" / "history.csv").read_text()
    assert len(csv.splitlines()) == 1 + 6

    # TensorBoard: every epoch's scalars exactly once, at the same steps, with the same values.
    # (write_steps_per_second=True: a mid-epoch resume must set up what on_epoch_begin would have.)
    expected = scalar_events(cnn_reference / "files" / "tensorboard")
    assert {step for (_, tag, step, _) in expected if tag == "epoch_loss"} == set(range(6))
    assert scalar_events(storage / "files" / "tensorboard") == expected


@pytest.mark.slow
def test_tensorboard_events_written_after_the_last_commit_are_cut_back(cnn_reference, tmp_path):
    """Killed 7 steps past its last commit, with those steps' batch summaries already on disk: the resumed
    run shows every summary exactly once, as the uninterrupted run does."""
    storage = tmp_path / "run"
    run_and_kill_at(storage, "train_batch_begin:47", tmp_path, CT_TEST_EVERY_STEPS="10",
                    expect={"epoch": 2, "batch": 8}, **CNN)
    log_dir = storage / "files" / "tensorboard"
    written = {step for (_, tag, step, _) in scalar_events(log_dir) if tag.startswith("batch_")}
    assert max(written) > 40, f"no summary after the commit at step 40 reached the disk ({sorted(written)[-3:]})"

    resumed = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="10", **CNN)
    assert resumed.returncode == 0, resumed.stderr

    expected = scalar_events(cnn_reference / "files" / "tensorboard")
    assert {step for (_, tag, step, _) in expected if tag == "batch_loss"} == set(range(4, 97, 4))
    assert scalar_events(log_dir) == expected
    assert "TensorBoard: cut" in resumed.stderr
