"""A checkpoint from another architecture: one clear line, non-zero exit, nothing stored changed."""

import pytest

from harness import cli, train_cmd, tree_digest


@pytest.mark.slow
def test_changed_architecture_is_a_clear_error_and_touches_nothing(mlp_reference, copy_of):
    storage = copy_of(mlp_reference)
    before = tree_digest(storage)

    result = cli(*train_cmd(storage, "--set", "units=32"))

    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    assert "continuing" not in result.stderr  # no promise to go on before the refusal
    assert "config differs from the run's checkpoint in units=64 (now 32)" in error_lines[0]  # the real reason
    assert "different model" in error_lines[0]
    assert "checkpoint has sequential/dense/kernel (20, 64)" in error_lines[0]
    assert "model has sequential/dense/kernel (20, 32)" in error_lines[0]
    assert "--storage" in error_lines[0]  # names the way out
    assert tree_digest(storage) == before


@pytest.mark.slow
def test_changed_callback_list_is_a_clear_error(mlp_reference, copy_of, tmp_path):
    storage = copy_of(mlp_reference)
    job = tmp_path / "fewer_callbacks.py"
    job.write_text(
        "import dataclasses, os\n"
        "os.environ.setdefault('CT_TEST_JOB', 'mlp')\n"
        "import cluster_trainer as ct\n"
        f"base = ct.load_job({str(train_cmd(storage)[1])!r})\n"
        "job = dataclasses.replace(base, callbacks=lambda config, run: list(base.callbacks(config, run))[:-1])\n"
    )
    before = tree_digest(storage)
    result = cli("run", str(job), "--storage", str(storage), "--devices", "2", "--verbose", "0", "--no-ray")
    assert result.returncode == 2
    assert "callbacks changed" in result.stderr
    assert tree_digest(storage) == before
