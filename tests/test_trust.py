"""A run's storage is input: nothing outside the run is touched, nothing stored runs code, a damaged,
crafted or foreign checkpoint is skipped with a warning, and every failure is one line.

Most cases are checked in this process against `CheckpointStore`, `RunFiles` and `train` on a real
run trained here (the MLP job, one epoch), on local disk and the real S3 server and GCS emulator;
the CLI runs in a subprocess only where its exit code and line are the promise. Each case checksums
the run and a sentinel directory outside it before and after.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import cluster_trainer as ct
from cluster_trainer import run_state
from cluster_trainer.checkpoint import CheckpointStore, Retention, register_attempt
from cluster_trainer.checkpoint.format import MANIFEST, crc32
from cluster_trainer.errors import StorageError
from cluster_trainer.run_files import RunFiles
from cluster_trainer.storage import Storage
from harness import ROOT, cli, cli_env, train_cmd

MLP = str(ROOT / "jobs" / "mlp.py")


def digest(path: Path) -> dict[str, str]:
    """Every entry below `path`: links by target (never followed), FIFOs as such, files by size and hash
    (of their first 16 MiB: a sparse terabyte is not read)."""
    found = {}
    for p in sorted(path.rglob("*")):
        key = str(p.relative_to(path))
        if p.is_symlink():
            found[key] = f"-> {os.readlink(p)}"
        elif p.is_fifo():
            found[key] = "fifo"
        elif p.is_file():
            with open(p, "rb") as f:
                found[key] = f"{p.stat().st_size} {hashlib.sha256(f.read(16 * 2**20)).hexdigest()}"
    return found


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """A directory outside every run, with a file a careless or hostile run would like to overwrite."""
    directory = tmp_path / "sentinel"
    directory.mkdir()
    (directory / "victim.txt").write_text("must never change\n")
    return directory


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> Path:
    """A real run of the MLP job (one epoch, a commit every 4 steps), trained in-process once per test
    session: the pytest-xdist workers share it (tests copy it before they change anything)."""
    from cluster_trainer.devices import make_strategy

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # the session's directory, above the workers'
    with open(shared / "trust-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = shared / "trust-run" / "run"
        if not (shared / "trust-run" / "trained").exists():
            shutil.rmtree(shared / "trust-run", ignore_errors=True)
            job = dataclasses.replace(ct.load_job(MLP), epochs=1,
                                      checkpoint=ct.CheckpointPolicy(every_steps=4, keep_last=3))
            ct.train(job, str(run), strategy=make_strategy(None), verbose=0, echo=lambda message: None,
                     handle_signals=False)
            (shared / "trust-run" / "trained").touch()
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the trained run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, symlinks=True)
    return copy


def store_of(run: Path, keep_last: int = 10) -> CheckpointStore:
    return CheckpointStore(Storage(str(run)), Retention(keep_last=keep_last), check_state=run_state.check)


def checkpoints(run: Path) -> list[str]:
    """Committed checkpoint directories, newest first."""
    return sorted((p.name for p in (run / "checkpoints").iterdir() if (p / MANIFEST).exists()), reverse=True)


def copy_checkpoint(run: Path, name: str, sequence: int, attempt: int | None = None) -> str:
    """A copy of checkpoint `name` committed as `sequence` (a later checkpoint of the same state)."""
    manifest = json.loads((run / "checkpoints" / name / MANIFEST).read_text())
    attempt = manifest["attempt"] if attempt is None else attempt
    new = f"c{sequence:08d}-s{manifest['step']:010d}-a{attempt:04d}"
    shutil.copytree(run / "checkpoints" / name, run / "checkpoints" / new)
    resign(run, new, lambda m: m.update(sequence=sequence, attempt=attempt))
    return new


def resign(run: Path, name: str, edit_manifest=None, files: dict[str, bytes] | None = None) -> None:
    """Rewrite checkpoint `name` with `files` replaced, and a manifest whose sizes and checksums match
    them, as anyone who can write the run's prefix can."""
    directory = run / "checkpoints" / name
    manifest = json.loads((directory / MANIFEST).read_text())
    for file, data in (files or {}).items():
        (directory / file).write_bytes(data)
    for entry in manifest["files"]:
        path = directory / entry["name"]
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            entry.update(size=len(data), crc32=crc32([data]))
    if edit_manifest is not None:
        edit_manifest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def state_of(run: Path, name: str) -> dict:
    return json.loads((run / "checkpoints" / name / "state.json").read_text())


def shard_header(header: object) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


# -- 1. paths from storage stay inside the run ------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_keys_that_lead_out_of_the_scratch_directory_are_never_written(store, request, sentinel, tmp_path,
                                                                       monkeypatch, caplog):
    """`files//abs/path`, `files/../../x`, `files/a/../../../x` planted under the run on the store: a resume
    restores the run's own files into its scratch directory and writes nothing anywhere else. (The GCS
    emulator refuses object names with `..`, which real GCS accepts; S3 takes all three.)"""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the scratch directory lives here
    (tmp_path / "tmp").mkdir()
    storage = Storage(request.getfixturevalue(store).uri())
    storage.put("files/history.csv", b"epoch,loss\n0,1.5\n")
    storage.put("files/tensorboard/train/events.out.tfevents.1", b"events")
    planted = [f"files/{sentinel}/absolute.txt"]  # files//tmp/.../sentinel/absolute.txt
    if store == "s3":
        planted += ["files/../../sentinel/up.txt", "files/a/../../../sentinel/through.txt",
                    "files/../../../../../../../../../../../../tmp/cluster-trainer-escaped.txt"]
    for key in planted:
        storage.fs.pipe_file(f"{storage.root}/{key}", b"planted")
    objects = {key: storage.get(key) for key in storage.list_files("")}
    before = digest(sentinel)

    files = RunFiles(storage)
    with caplog.at_level(logging.WARNING):
        files.restore()
    restored = {str(p.relative_to(files.local_dir)) for p in Path(files.local_dir).rglob("*") if p.is_file()}
    assert restored == {"history.csv", "tensorboard/train/events.out.tfevents.1"}
    assert (Path(files.local_dir) / "history.csv").read_bytes() == b"epoch,loss\n0,1.5\n"
    assert digest(sentinel) == before
    assert not Path("/tmp/cluster-trainer-escaped.txt").exists()
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == {
        "sentinel/victim.txt", *(f"{Path(files.local_dir).relative_to(tmp_path)}/{f}" for f in restored)}
    for key in planted:
        assert f"not restoring {storage.path(key)}: " in caplog.text
    assert {key: storage.get(key) for key in storage.list_files("")} == objects  # nothing in the run changed
    files.close()
    assert not os.path.exists(files.local_dir)


def test_a_link_in_a_local_runs_files_is_refused_before_anything_is_written(run, sentinel, caplog):
    """A resume would have ModelCheckpoint write best.keras through the link, onto its target."""
    target = sentinel / "victim.txt"
    (run / "files" / "best.keras").unlink()
    (run / "files" / "best.keras").symlink_to(target)
    before, outside = digest(run), digest(sentinel)
    job = dataclasses.replace(ct.load_job(MLP), epochs=2)
    with pytest.raises(StorageError) as raised:
        ct.train(job, str(run), verbose=0, echo=lambda message: None, handle_signals=False)
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    assert message.startswith(f"{run}/files/best.keras is a symbolic link") and "remove it" in message
    assert digest(run) == before and digest(sentinel) == outside  # no attempt registered, nothing written


def test_csv_and_event_files_are_never_cut_back_through_a_link(tmp_path, sentinel):
    """CSVLogger's file and TensorBoard's event files are cut back on resume: never a link's target."""
    from cluster_trainer import callback_state
    from cluster_trainer.confined import UnsafePathError

    logs = tmp_path / "files"
    (logs / "train").mkdir(parents=True)
    (logs / "history.csv").symlink_to(sentinel / "victim.txt")
    (logs / "train" / "events.out.tfevents.1.host.1.v2").symlink_to(sentinel / "victim.txt")
    before = digest(sentinel)
    with pytest.raises(UnsafePathError, match="history.csv is a symbolic link"):
        callback_state._truncate(str(logs / "history.csv"), 0)
    with pytest.raises(UnsafePathError, match="events.out.tfevents.1.host.1.v2 is a symbolic link"):
        callback_state._cut_back_event_files(str(logs), {}, built_at=time.time())
    os.mkfifo(logs / "fifo.csv")  # a FIFO would block a plain open
    with pytest.raises(UnsafePathError, match="not a regular file"):
        callback_state._truncate(str(logs / "fifo.csv"), 0)
    assert digest(sentinel) == before


@pytest.mark.parametrize("kind", ["link to /dev/zero", "FIFO", "a terabyte larger than its manifest says",
                                  "link out of the run", "directory linked out of the run"])
def test_a_shard_that_is_not_the_file_its_manifest_describes_is_skipped_unread(kind, run, sentinel, caplog):
    """Nothing is read through a link or past the manifest's size; `status` falls back to the previous
    checkpoint, at once (a FIFO or /dev/zero read whole would hang or fill memory)."""
    from cluster_trainer.history import latest_checkpoint

    newest, previous = checkpoints(run)[:2]
    directory = run / "checkpoints" / newest
    shard = directory / "shard-00000.safetensors"
    (sentinel / "shard.safetensors").write_bytes(shard.read_bytes())
    if kind == "link to /dev/zero":
        shard.unlink()
        shard.symlink_to("/dev/zero")
    elif kind == "FIFO":
        shard.unlink()
        os.mkfifo(shard)
    elif kind == "a terabyte larger than its manifest says":
        os.truncate(shard, shard.stat().st_size + 2**40)  # sparse: costs no disk, would cost 1 TB of memory
    elif kind == "link out of the run":
        shard.unlink()
        shard.symlink_to(sentinel / "shard.safetensors")  # the very bytes the manifest names
    else:
        moved = sentinel / newest
        shutil.move(directory, moved)
        directory.symlink_to(moved, target_is_directory=True)
    before, outside = digest(run), digest(sentinel)
    with caplog.at_level(logging.WARNING):
        loaded = latest_checkpoint(str(run))
    assert loaded.name == previous
    # A linked checkpoint directory is not even listed (fsspec does not descend into it); were it, the read
    # would refuse it like the others.
    assert f"skipping checkpoint {newest}" in caplog.text or kind == "directory linked out of the run"
    assert digest(run) == before and digest(sentinel) == outside


# -- 2. a run knows its identity; damaged attempt records -------------------------------------------------


def test_a_checkpoint_of_another_run_is_skipped_with_a_warning_and_never_pruned(run, caplog):
    """Copied in from another run of the same job, with a later sequence: not resumed, not pruned,
    and the run's own newer checkpoints are kept."""
    own = checkpoints(run)
    foreign = copy_checkpoint(run, own[0], sequence=int(own[0][1:9]) + 5)
    state = state_of(run, foreign)
    state["run_id"] = "another-run"
    resign(run, foreign, lambda m: m.update(run_id="another-run"), {"state.json": json.dumps(state).encode()})
    store = store_of(run, keep_last=1)
    with caplog.at_level(logging.WARNING):
        loaded = store.load_latest()
    assert loaded.name == own[0]
    assert f"skipping checkpoint {foreign}" in caplog.text and "belongs to run another-run" in caplog.text
    # The run goes on: a new attempt commits and prunes with keep_last=1.
    run_id = store.run_id()
    assert run_id == loaded.state["run_id"] != "another-run"
    attempt = register_attempt(store.storage, loaded.sequence, run_id)
    name = store.commit(sequence=store.highest_sequence() + 1, step=loaded.step + 1, attempt=attempt,
                        tensors=loaded.tensors, state=loaded.state, run_id=run_id)
    assert checkpoints(run) == [name, foreign]  # its own older ones pruned, the foreign one kept
    assert store.load_latest().name == name


@pytest.mark.parametrize("record", [
    b"{not json",
    b'{"attempt": 9, "resumed_from_sequence": 0, "run_id": null}',  # "started fresh" over committed checkpoints
    b'{"attempt": 9, "resumed_from_sequence": 1, "run_id": null}',  # resumed from nothing committed (c1 is gone)
    b'{"attempt": 9, "resumed_from_sequence": 1, "run_id": "another-run"}',
    b'[' * 100_000 + b']' * 100_000,
], ids=["unparsable", "fresh-start-over-checkpoints", "unknown-resume-point", "another-run", "nested"])
def test_a_damaged_attempt_record_is_ignored_and_never_restarts_the_run(record, run, caplog):
    own = checkpoints(run)
    (run / "attempts" / "a000009.json").write_bytes(record)
    store = store_of(run)
    with caplog.at_level(logging.WARNING):
        loaded = store.load_latest()
    assert loaded.name == own[0]
    assert f"ignoring attempt record {run}/attempts/a000009.json" in caplog.text
    # The next attempt registers after it, resumes from the newest checkpoint and counts its commits.
    attempt = register_attempt(store.storage, loaded.sequence, store.run_id())
    assert attempt == 10
    name = store.commit(sequence=store.highest_sequence() + 1, step=loaded.step + 1, attempt=attempt,
                        tensors=loaded.tensors, state=loaded.state, run_id=store.run_id())
    assert store.committed()[:2] == [name, own[0]]


def test_superseded_checkpoints_are_pruned_once_they_cannot_count_and_a_zombie_prunes_nothing(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    store = CheckpointStore(storage, Retention(keep_last=10))
    tensors = {"w": np.zeros(2, "float32")}
    first = register_attempt(storage, 0, "run-1")
    names = [store.commit(sequence=s, step=s, attempt=first, tensors=tensors, state={}, run_id="run-1")
             for s in (1, 2, 3)]
    second = register_attempt(storage, 1, "run-1")  # resumed from c1: c2 and c3 of attempt 1 never count again
    assert store.committed() == [names[0]]
    store.prune(current_attempt=first)  # the zombie deletes nothing
    assert checkpoints(tmp_path / "run") == names[::-1]
    latest = store.commit(sequence=4, step=4, attempt=second, tensors=tensors, state={}, run_id="run-1")
    assert checkpoints(tmp_path / "run") == [latest, names[0]]


# -- 3. any defect in a checkpoint's content is a skip, never a crash ------------------------------------


SHARD, STATE = "shard-00000.safetensors", "state.json"
CRAFTED = {
    "shard header is a JSON list": lambda state, shard: {SHARD: shard_header([1, 2])},
    "BF16 with bad offsets": lambda state, shard: {SHARD: shard_header(
        {"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 1 << 40]}}) + b"\0" * 8},
    "unknown dtype": lambda state, shard: {SHARD: shard_header(
        {"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}) + b"\0"},
    "negative shape": lambda state, shard: {SHARD: shard_header(
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}) + b"\0" * 4},
    "state nested 200k deep": lambda state, shard: {STATE: b"[" * 200_000 + b"]" * 200_000},
    "state {}": lambda state, shard: {STATE: b"{}"},
    "state [1]": lambda state, shard: {STATE: b"[1]"},
    "state position of strings": lambda state, shard: {STATE: json.dumps(
        {**state, "position": {**state["position"], "epoch": "0"}}).encode()},
    "state with a variable missing its tensor": lambda state, shard: {STATE: json.dumps(
        {**state, "variables": state["variables"] + [{**state["variables"][0], "key": "model/trainable/99999"}]}
    ).encode()},
}
CRAFTED_MANIFESTS = {
    "file named ''": lambda m: m["files"][0].update(name=""),
    "file named with a NUL": lambda m: m["files"][0].update(name="shard\0.safetensors"),
    "file named ../../x": lambda m: m["files"][0].update(name="../../x"),
    "files is a string": lambda m: m.update(files="all"),
    "size is true": lambda m: m["files"][0].update(size=True),
    "metrics is a list": lambda m: m.update(metrics=[1]),
    "tensor in an unlisted file": lambda m: m["tensors"].update(extra="elsewhere.safetensors"),
}


@pytest.mark.parametrize("case", [*CRAFTED, *CRAFTED_MANIFESTS])
def test_a_crafted_checkpoint_with_right_checksums_is_skipped_and_the_previous_one_loads(case, run, caplog):
    own = checkpoints(run)
    crafted = copy_checkpoint(run, own[0], sequence=int(own[0][1:9]) + 1)
    shard = (run / "checkpoints" / crafted / "shard-00000.safetensors").read_bytes()
    if case in CRAFTED:
        resign(run, crafted, files=CRAFTED[case](state_of(run, crafted), shard))
    else:
        resign(run, crafted, CRAFTED_MANIFESTS[case])
    before = digest(run)
    with caplog.at_level(logging.WARNING):
        loaded = store_of(run).load_latest()
    assert loaded.name == own[0]
    assert f"skipping checkpoint {crafted}" in caplog.text
    assert digest(run) == before


def _mutate_json(value, rng: random.Random, depth: int = 0):
    """`value` with one random structural change somewhere inside it."""
    odd = [None, True, False, -1, 0, 2**63, 1.5, float("nan"), "", "x" * 40, [], {}, [1], {"a": 1}, "../../x",
           "a\0b", [[[[[]]]]]]
    if isinstance(value, dict) and value and rng.random() < 0.75:
        key = rng.choice(sorted(value))
        choice = rng.random()
        if choice < 0.25:
            return {k: v for k, v in value.items() if k != key}
        if choice < 0.4:
            return {**value, rng.choice(["", "__tensor__", "extra", "0"]): rng.choice(odd)}
        return {**value, key: _mutate_json(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and rng.random() < 0.75:
        index = rng.randrange(len(value))
        choice = rng.random()
        if choice < 0.2:
            return value[:index] + value[index + 1:]
        if choice < 0.3:
            return value + [rng.choice(odd)]
        return value[:index] + [_mutate_json(value[index], rng, depth + 1)] + value[index + 1:]
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value + rng.choice([-1, 1, 1 << 40, -(1 << 40)])
    return rng.choice(odd)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    choice = rng.random()
    if choice < 0.4 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice < 0.6:
        del data[rng.randrange(len(data) + 1):]
    elif choice < 0.8:
        data[rng.randrange(len(data) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(data), 2**63, 2**64 - 1]))
    return bytes(data)


def test_fuzzed_checkpoints_are_skipped_or_loaded_and_never_crash_or_read_past_their_sizes(run, sentinel, caplog):
    """Seeded: 300 checkpoints whose manifest, state.json or shard header is mutated, mostly re-signed
    with matching sizes and checksums (an adversary), sometimes not (bit rot), sometimes grown past their
    manifest's size. Each is skipped with a warning (the previous checkpoint loads) or, if it still is a
    valid checkpoint of this run, loaded; nothing else is raised and nothing outside the run changes."""
    rng = random.Random(20261201)
    good = checkpoints(run)[0]
    store = store_of(run)
    outside, before = digest(sentinel), digest(run)
    outcomes = {"skipped": 0, "loaded": 0}
    for case in range(300):
        crafted = copy_checkpoint(run, good, sequence=int(good[1:9]) + 1)
        directory = run / "checkpoints" / crafted
        target = rng.choice(["manifest", "state", "shard", "shard header"])
        if target == "manifest":
            manifest = json.loads((directory / MANIFEST).read_text())
            text = json.dumps(_mutate_json(manifest, rng)).encode()
            (directory / MANIFEST).write_bytes(_mutate_bytes(text, rng) if rng.random() < 0.2 else text)
        else:
            if target == "state":
                state = json.loads((directory / "state.json").read_bytes())
                data = json.dumps(_mutate_json(state, rng)).encode()
                name = "state.json"
            else:
                name = "shard-00000.safetensors"
                data = (directory / name).read_bytes()
                (length,) = struct.unpack_from("<Q", data)
                if target == "shard header":
                    header = _mutate_json(json.loads(data[8:8 + length]), rng)
                    data = shard_header(header) + data[8 + length:]
                else:
                    data = _mutate_bytes(data, rng)
            (directory / name).write_bytes(data)
            if rng.random() < 0.85:
                resign(run, crafted)
            elif rng.random() < 0.5:
                with open(directory / name, "ab") as f:  # grown past what the manifest says
                    f.truncate(len(data) + rng.choice([1, 4096, 2**40]))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = store.load_latest()
        assert loaded is not None and loaded.name in (crafted, good), (case, target)
        if loaded.name == good:
            outcomes["skipped"] += 1
            assert f"skipping checkpoint {crafted}" in caplog.text, (case, target)
        else:
            outcomes["loaded"] += 1
            run_state.check(loaded, "fuzz")
        shutil.rmtree(directory)
    assert digest(sentinel) == outside and digest(run) == before  # the reader wrote, cut and deleted nothing
    assert outcomes["skipped"] > 200, outcomes  # the mutations do reach the checks


def test_the_state_schema_knows_the_loops_position_and_accepts_a_real_run(trained_run):
    from cluster_trainer.loop import Position

    assert set(run_state.POSITION_FIELDS) == {field.name for field in dataclasses.fields(Position)}
    store = store_of(trained_run)
    for name in store.committed():
        store.read(name)  # every real checkpoint passes the schema


# -- 4. one line for what the user can fix -----------------------------------------------------------------


def test_a_full_disk_under_a_callback_is_one_line_and_scratch_directories_are_removed(tmp_path, monkeypatch):
    """A callback's write fails with ENOSPC (a real one: /dev/full); and a run preempted before it trained.
    Both on an object store (memory://), whose scratch copy of files/ is removed whatever the exit."""
    import keras

    from cluster_trainer.preemption import FileNotice, PreemptedError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def fill_the_disk(logs=None):
        with open("/dev/full", "wb") as f:
            f.write(b"best model")

    base = ct.load_job(MLP)
    full = dataclasses.replace(base, callbacks=lambda config, run: [keras.callbacks.LambdaCallback(
        on_train_begin=fill_the_disk)])
    with pytest.raises(StorageError) as raised:
        ct.train(full, f"memory://trust-{os.getpid()}/full", verbose=0, echo=lambda m: None, handle_signals=False)
    assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
    assert str(raised.value).startswith("a write failed: no space left on device (ENOSPC). Free space")
    assert list((tmp_path / "tmp").iterdir()) == []

    notice = tmp_path / "preempt"
    notice.write_text("")
    with pytest.raises(PreemptedError):
        ct.train(base, f"memory://trust-{os.getpid()}/preempted", verbose=0, echo=lambda m: None,
                 handle_signals=False, notice_sources=[FileNotice(str(notice))])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_unknown_storage_option_is_refused_before_any_request():
    """s3fs would take it and fail at the first request (botocore); gcsfs would ignore it. The CLI prints
    this `StorageError` as its one line, like every `ClusterTrainerError`."""
    with pytest.raises(StorageError, match="unknown storage option 'endpont_url' for s3:// .*did you mean "
                                           "'endpoint_url'"):
        Storage("s3://bucket/run", {"endpont_url": "http://127.0.0.1:1"})
    Storage("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:1", "profile": "x", "anon": True})
    with pytest.raises(StorageError, match="unknown storage option 'project_id' for gs://"):
        Storage("gs://bucket/run", {"project_id": "p"})  # gcsfs would ignore it silently


@pytest.mark.parametrize("case", ["export without --job", "export into a missing directory", "history of a file"])
def test_bad_input_before_training_is_one_line_exit_2_and_touches_nothing(case, run, sentinel):
    plain_file = sentinel / "victim.txt"
    args, message = {
        "export without --job": (["export", str(run), str(sentinel / "m.keras")],
                                 "export needs --job JOB.py, the job file that trained the run"),
        "export into a missing directory": (["export", str(run), str(sentinel / "no" / "m.keras"), "--job", MLP],
                                            f"the directory {sentinel / 'no'} does not exist"),
        "history of a file": (["history", str(plain_file)], f"{plain_file} is a file, not a run's directory"),
    }[case]
    before, outside = digest(run), digest(sentinel)
    result = cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("cluster-trainer: error: ") and message in lines[0], lines[0]
    assert digest(run) == before and digest(sentinel) == outside


@pytest.mark.slow
def test_read_only_storage_is_one_line_when_the_attempt_registers(run, sentinel):
    """The run's directory mounted read-only (a real EROFS, in a mount namespace of the command's own)."""
    before, outside = digest(run), digest(sentinel)
    command = " ".join([f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && exec", sys.executable,
                        "-m cluster_trainer run", MLP, "--storage", str(run), "--epochs 2 --no-ray --verbose 0"])
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", command], env=cli_env(),
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cluster-trainer: error: cannot write {run}/attempts") and \
        "read-only file system (EROFS). Make the storage writable" in lines[0], lines[0]
    assert digest(run) == before and digest(sentinel) == outside


def _importing_tensorflow(pid: int) -> bool:
    """Whether the process has begun importing TensorFlow (its library is mapped; the import takes seconds
    more), and takes SIGTERM itself by then."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    with open(f"/proc/{pid}/maps") as f:
        mapped = "libtensorflow" in f.read()
    return mapped and bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
def test_a_sigterm_while_the_command_starts_exits_75_and_writes_nothing(tmp_path):
    """Sent while TensorFlow imports (where it killed the process with -15): exit 75, one line, no run."""
    storage = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "cluster_trainer", *train_cmd(storage)], env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and not _importing_tensorflow(process.pid):
            assert time.monotonic() < deadline, "the command did not start importing TensorFlow"
            time.sleep(0.005)
        assert process.poll() is None, "the command ended before it imported TensorFlow"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 75 and len(lines) == 1, stderr
    assert lines[0] == ("cluster-trainer: preempted (SIGTERM) before training started; nothing was written. "
                        "Run the same command again")
    assert not storage.exists()
