import os
import shutil

import pytest

from harness import cli, latest, train_cmd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def mlp_reference(tmp_path_factory):
    """The uninterrupted MLP run (default checkpoint policy), shared by the resume tests."""
    storage = tmp_path_factory.mktemp("mlp-reference") / "run"
    result = cli(*train_cmd(storage))
    assert result.returncode == 0, result.stderr
    return storage


@pytest.fixture
def copy_of(tmp_path):
    def copy(storage):
        target = tmp_path / "copy"
        shutil.copytree(storage, target)
        return target

    return copy
