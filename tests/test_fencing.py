"""One writer: attempts are numbered, a superseded attempt's commits never count."""

import numpy as np
import pytest

from cluster_trainer.checkpoint import CheckpointStore, Retention, SupersededError, register_attempt
from cluster_trainer.storage import Storage


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "run"))


def commit(store, sequence, attempt, value):
    return store.commit(sequence=sequence, step=sequence, attempt=attempt,
                        tensors={"w": np.full(2, value, "float32")}, state={"by": attempt})


def test_attempts_are_numbered_once_each(storage):
    assert [register_attempt(storage, 0) for _ in range(3)] == [1, 2, 3]


def test_a_superseded_writer_cannot_commit(storage):
    store = CheckpointStore(storage, Retention(keep_last=10))
    first = register_attempt(storage, 0)
    commit(store, 1, first, 1.0)
    second = register_attempt(storage, resumed_from_sequence=1)
    with pytest.raises(SupersededError, match="superseded by attempt 2"):
        commit(store, 2, first, 9.0)
    assert not storage.exists("checkpoints/c00000002-s0000000002-a0001/MANIFEST.json")
    commit(store, 2, second, 2.0)
    assert store.load_latest().state == {"by": 2}


def test_a_zombie_commit_that_raced_the_check_is_never_chosen(storage):
    store = CheckpointStore(storage, Retention(keep_last=10))
    first = register_attempt(storage, 0)
    commit(store, 5, first, 1.0)
    register_attempt(storage, resumed_from_sequence=5)  # a new process took over from c5
    # The old process passed its check just before that, and writes its manifest now:
    zombie = CheckpointStore(storage, Retention(keep_last=10))
    zombie_name = "c00000009-s0000000009-a0001"
    from cluster_trainer.checkpoint.format import serialize

    files, manifest = serialize(sequence=9, step=9, attempt=first, tensors={"w": np.zeros(2, "float32")}, state={"by": 1})
    zombie.storage.put_many({f"checkpoints/{zombie_name}/{f}": d for f, d in files.items()})
    zombie.storage.put(f"checkpoints/{zombie_name}/MANIFEST.json", manifest)
    assert zombie_name not in store.committed()
    assert store.load_latest().sequence == 5


def test_after_a_corrupt_newest_checkpoint_new_commits_sort_after_it_and_the_good_one_is_kept(storage):
    """Resumed from c2 because c3 and c4 are corrupt: new commits must not sort under c4,
    and retention must not delete c2 to make room for them."""
    store = CheckpointStore(storage, Retention(keep_last=3))
    first = register_attempt(storage, 0)
    for sequence in range(1, 5):
        commit(store, sequence, first, float(sequence))
    for name in ("c00000003-s0000000003-a0001", "c00000004-s0000000004-a0001"):
        storage.put(f"checkpoints/{name}/state.json", b'{"by": 7}')  # same length, other bytes
    resumed = store.load_latest()
    assert resumed.sequence == 2
    second = register_attempt(storage, resumed_from_sequence=resumed.sequence)
    assert store.highest_sequence() == 4
    name = commit(store, store.highest_sequence() + 1, second, 5.0)
    assert store.committed() == [name, resumed.name]  # the superseded corrupt ones no longer count
    assert storage.exists(f"checkpoints/{resumed.name}/MANIFEST.json")


def test_a_store_that_stays_down_does_not_stop_training_but_the_final_save_fails_loudly(tmp_path, caplog):
    """Saves that fail are logged and training goes on; wait() (the final save) raises an exit-1 error."""
    import socket

    from cluster_trainer.checkpoint import CheckpointWriter
    from cluster_trainer.errors import EXIT_FAILURE, CheckpointWriteError
    from cluster_trainer.storage import RetryPolicy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed
    storage = Storage("s3://down/run", {"endpoint_url": dead, "key": "k", "secret": "s",
                                        "config_kwargs": {"connect_timeout": 0.2, "retries": {"max_attempts": 1}}},
                      retry=RetryPolicy(attempts=2, base_seconds=0.01, max_seconds=0.02))
    writer = CheckpointWriter(CheckpointStore(storage))
    with caplog.at_level("ERROR"):
        for sequence in (1, 2):
            writer.save(sequence=sequence, step=sequence, attempt=1, tensors={"w": np.zeros(2)}, state={})
        with pytest.raises(CheckpointWriteError, match="final checkpoint could not be written") as raised:
            writer.wait()
    assert raised.value.exit_code == EXIT_FAILURE
    assert caplog.text.count("CHECKPOINT NOT SAVED") == 2
    writer.close()
