"""The CLI's promises: status, history, export, --set, and one-line errors with exit code 2."""

import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from cluster_trainer.history import parquet_frame, read_history

from harness import ROOT, TEST_JOB, cli, cli_env, latest, tree_digest

MLP = str(ROOT / "jobs" / "mlp.py")


def test_help_teaches_commands_and_exit_codes():
    result = cli("--help")
    assert result.returncode == 0
    for word in ("run", "status", "history", "export", "exit codes", "75"):
        assert word in result.stdout
    run_help = cli("run", "--help").stdout
    assert "--storage" in run_help and "--set" in run_help and "--devices" in run_help


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no/such/job.py", "--storage", "x"], "job file not found"),
        (["run", MLP, "--storage", "x", "--set", "nosuch=1"], "no such config key; the job's keys are: lr, units"),
        (["run", MLP, "--storage", "x", "--set", "units=wide"], "expected an int"),
        (["run", MLP, "--storage", "nosuchscheme://bucket/run"], "cannot use storage URI"),
        (["status", "/nonexistent/run"], "no committed checkpoint under /nonexistent/run"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cluster-trainer: error:"), result.stderr
    assert message in lines[0]


def test_what_needs_no_job_file_is_refused_before_tensorflow_is_imported(tmp_path):
    # TensorFlow's import takes seconds (20 on a loaded machine): a typo must not wait for it.
    refused = [
        ["run", "no/such/job.py", "--storage", "x"],
        ["run", MLP, "--storage", "nosuchscheme://bucket/run"],
        ["run", MLP, "--storage", "s3://bucket/run", "--storage-option", "endpoint_ulr=http://127.0.0.1:1"],
        ["run", MLP, "--storage", "x", "--resource", "spot"],
        ["run", MLP, "--storage", "x", "--max-failures", "-1"],
        ["run", MLP, "--storage", "x", "--ray-address", "127.0.0.1:1"],
        ["sweep", MLP, "--storage", "x", "--grid", "lr=1,2", "--ray-address", "not-an-address"],
        ["export", str(tmp_path), str(tmp_path / "model.h5"), "--job", MLP],
    ]
    script = ("import json, sys\n"
              "from cluster_trainer.cli import main\n"
              f"codes = [main(argv) for argv in {refused!r}]\n"
              "print(json.dumps([codes, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)]))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    codes, imported = json.loads(result.stdout)
    assert codes == [2] * len(refused), result.stderr
    assert imported == [], result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cluster-trainer: error: ")]
    assert len(errors) == len(refused), result.stderr
    assert "did you mean 'endpoint_url'?" in errors[2] and "not HOST:PORT or auto" in errors[6], errors
    assert "--no-ray" in errors[5] and "--no-ray" not in errors[6], errors  # `sweep` has no --no-ray to offer
    assert not (tmp_path / "x").exists()


def test_a_keras_backend_other_than_tensorflow_is_refused_in_one_line_before_the_job_loads(tmp_path):
    result = cli("run", MLP, "--storage", str(tmp_path / "run"), "--no-ray", KERAS_BACKEND="numpy")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "cluster-trainer: error: Keras is set to the 'numpy' backend; cluster-trainer drives TensorFlow's "
        "distribution strategies: set KERAS_BACKEND=tensorflow (or \"backend\": \"tensorflow\" in ~/.keras/keras.json)"]
    assert not (tmp_path / "run").exists()


def test_job_file_without_job_names_the_fix(tmp_path):
    job = tmp_path / "empty.py"
    job.write_text("x = 1\n")
    result = cli("run", str(job), "--storage", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "defines no module-level `job`; add `job = cluster_trainer.Job(...)`" in result.stderr


@pytest.mark.slow
def test_status_history_and_export_of_a_finished_run(mlp_reference, tmp_path):
    before = tree_digest(mlp_reference)

    status = cli("status", str(mlp_reference), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    checkpoint = latest(mlp_reference)
    assert info["state"] == "complete"
    assert info["global_step"] == checkpoint.state["position"]["global_step"]
    assert info["checkpoint"] == checkpoint.name
    assert info["cadence"]["interval"]["steps"] == 8  # the job's fixed every_steps, with what was measured
    text = cli("status", str(mlp_reference)).stdout
    assert "saves      every 8 steps: CheckpointPolicy(every_steps=8)\n" in text
    assert re.search(r"flush      ~[\d.]+ s for [\d.]+ kB \(measured\), within the grace period", text), text

    history = cli("history", str(mlp_reference), "--format", "csv")
    assert history.returncode == 0, history.stderr
    frame = pd.read_csv(io.StringIO(history.stdout))
    stored = checkpoint.state["callbacks"]["04-History"]
    assert frame["epoch"].tolist() == stored["epoch"] == list(range(len(stored["epoch"])))
    assert frame["val_loss"].tolist() == stored["history"]["val_loss"]  # full precision, exactly once

    parquet = tmp_path / "history.parquet"
    assert cli("history", str(mlp_reference), "--format", "parquet", "-o", str(parquet)).returncode == 0
    pd.testing.assert_frame_equal(parquet_frame(parquet.read_bytes()), read_history(str(mlp_reference)))

    out = tmp_path / "model.keras"
    export = cli("export", str(mlp_reference), str(out), "--job", TEST_JOB)
    assert export.returncode == 0, export.stderr

    import keras
    import numpy as np

    model = keras.models.load_model(out)
    for i, weight in enumerate(model.trainable_weights):
        assert np.array_equal(keras.ops.convert_to_numpy(weight), checkpoint.tensors[f"model/trainable/{i:05d}"])
    assert tree_digest(mlp_reference) == before
