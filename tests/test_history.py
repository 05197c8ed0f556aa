"""The history rows: kept in the checkpoint, published as Parquet, plotted."""

import json

import pandas as pd
import pytest

from cluster_trainer.errors import CheckpointError
from cluster_trainer.history import EPOCHS_FILE, HistoryRecorder, parquet_frame, plot_history, read_history
from harness import cli


def _through_json(state):
    """What a resumed process gets back: the checkpoint's state.json round trip sorts keys."""
    return json.loads(json.dumps(state, sort_keys=True))


def test_a_resumed_recorder_keeps_rows_once_and_counts_the_epoch_time_of_both_attempts():
    first = HistoryRecorder(attempt=1, every_steps=2, host="a")
    first.begin_epoch(0)
    first.add_step(0, 1, 2, {"loss": 1.0}, 0.1)
    first.end_epoch(0, 4, {"loss": 0.9, "val_loss": 1.1, "accuracy": 0.5}, 0.1)
    first.begin_epoch(1)
    state = _through_json(first.state())  # committed mid-epoch 1
    state["epoch_seconds"] = 5.0  # as if epoch 1 had run 5 s before the commit

    second = HistoryRecorder(attempt=2, every_steps=2, host="b")
    second.restore(state, mid_epoch=True)
    second.end_epoch(1, 8, {"loss": 0.8, "val_loss": 1.0, "accuracy": 0.6}, 0.05)
    epochs = parquet_frame(second.tables()[EPOCHS_FILE])
    assert list(epochs["epoch"]) == [0, 1]
    assert list(epochs.columns) == ["epoch", "global_step", "loss", "accuracy", "val_loss", "learning_rate",
                                    "epoch_seconds", "attempt", "host", "resumed", "ended_at"]
    assert list(epochs["attempt"]) == [1, 2] and list(epochs["host"]) == ["a", "b"]
    assert list(epochs["resumed"]) == [False, True]
    assert epochs["epoch_seconds"][1] >= 5.0
    assert str(epochs["ended_at"].dtype) == "datetime64[us, UTC]"
    assert "history/steps.parquet" in second.tables()


def test_rows_published_before_and_after_a_resume_have_the_same_columns_in_the_same_order():
    recorder = HistoryRecorder(attempt=1)
    recorder.begin_epoch(0)
    recorder.end_epoch(0, 4, {"loss": 0.9, "val_loss": 1.1, "val_accuracy": 0.4, "accuracy": 0.5}, 0.1)
    before = parquet_frame(recorder.tables()[EPOCHS_FILE])
    resumed = HistoryRecorder(attempt=2)
    resumed.restore(_through_json(recorder.state()), mid_epoch=False)
    after = parquet_frame(resumed.tables()[EPOCHS_FILE])
    assert list(after.columns) == list(before.columns)
    assert after.drop(columns=["ended_at"]).equals(before.drop(columns=["ended_at"]))


def test_a_uri_without_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        read_history(str(tmp_path / "nothing"))


def test_plot_marks_resumed_epochs(tmp_path):
    frame = pd.DataFrame({"epoch": [0, 1, 2], "loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.85],
                          "learning_rate": [0.01, 0.01, 0.005], "attempt": [1, 2, 2], "resumed": [False, True, False]})
    out = tmp_path / "history.png"
    plot_history(frame, str(out), title="run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_cli_history_reads_the_parquet_and_plots_it(mlp_reference, tmp_path):
    stored = parquet_frame((mlp_reference / "history" / "epochs.parquet").read_bytes())
    assert list(stored["epoch"]) == list(range(len(stored))) and stored["attempt"].eq(1).all()
    shown = cli("history", str(mlp_reference), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [row["val_loss"] for row in rows] == stored["val_loss"].tolist()  # full precision
    assert rows[0]["ended_at"] == stored["ended_at"][0].isoformat()
    plotted = cli("history", str(mlp_reference), "--plot", str(tmp_path / "h.png"))
    assert plotted.returncode == 0 and (tmp_path / "h.png").stat().st_size > 10_000, plotted.stderr
    steps = cli("history", str(mlp_reference), "--steps")
    assert steps.returncode == 2 and "history_every_steps" in steps.stderr
