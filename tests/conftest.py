import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

import pytest  # noqa: E402

from harness import cli, once_per_session, train_cmd  # noqa: E402
from stores import GCSServer, S3Server  # noqa: E402
from workers_harness import WORKERS_EPOCHS, WorkerGroup  # noqa: E402


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
def mlp_reference(tmp_path_factory, worker_id):
    """The uninterrupted MLP run (default checkpoint policy), shared by the resume tests: trained once
    per session, even under pytest-xdist. Tests read it; one that would change it works on `copy_of` it."""

    def train(work: Path) -> dict:
        result = cli(*train_cmd(work / "run"))
        assert result.returncode == 0, result.stderr
        return {"storage": str(work / "run")}

    return Path(once_per_session(tmp_path_factory, worker_id, "mlp-reference", train)["storage"])


@pytest.fixture(scope="session")
def two_workers(tmp_path_factory, worker_id):
    """The uninterrupted run on 2 workers x 1 device (processes on 127.0.0.1, no Ray), once per session
    even under pytest-xdist: its storage and each worker's output. The reference of every multi-worker
    comparison, on Ray too (a group Ray places trains the same bits)."""

    def train(work: Path) -> dict:
        with WorkerGroup(work / "run", work, *WORKERS_EPOCHS) as group:
            codes = group.wait()
        assert codes == [0, 0], group.outputs()
        return {"storage": str(work / "run"), "outputs": [group.output(i) for i in range(2)]}

    result = once_per_session(tmp_path_factory, worker_id, "two-workers", train)
    return Path(result["storage"]), result["outputs"]


@pytest.fixture
def copy_of(tmp_path):
    def copy(storage):
        target = tmp_path / "copy"
        shutil.copytree(storage, target)
        return target

    return copy


def pytest_collection_modifyitems(config, items):
    """Slow tests first, the quick ones after them (each group in collection order).

    `make test` runs pytest-xdist's worksteal scheduler: each worker starts on its half of the list and
    an idle one takes half of what another has left. A minutes-long test started last would keep one
    worker busy while the other idles; started first, the slow tests overlap, and the hundreds of quick
    ones fill in whatever gap is left at the end.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
