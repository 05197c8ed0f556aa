import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

import pytest  # noqa: E402

from harness import cli, train_cmd  # noqa: E402
from stores import GCSServer, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs():
    server = GCSServer()
    yield server
    server.stop()


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
