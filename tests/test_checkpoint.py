"""The checkpoint format: manifest-last commit, verification, fallback, retention."""

import json
import logging

import numpy as np
import pytest

from cluster_trainer.checkpoint import CheckpointStore, Retention
from cluster_trainer.errors import CheckpointError
from cluster_trainer.storage import Storage


def commit(store, sequence, **tensors):
    return store.commit(sequence=sequence, step=sequence * 10, attempt=1, tensors=tensors, state={"n": sequence})


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(Storage(str(tmp_path / "run")), Retention(keep_last=10), shard_bytes=64)


def test_round_trip_keeps_dtypes_shapes_and_scalars(store):
    tensors = {
        "scalar_int": np.array(7, dtype="int64"),
        "scalar_float": np.array(0.25, dtype="float32"),
        "matrix": np.arange(12, dtype="float32").reshape(3, 4),
        "seed": np.array([1, 2], dtype="int64"),
        "flags": np.array([True, False]),
        "transposed": np.arange(6, dtype="float64").reshape(2, 3).T,  # not C-contiguous
    }
    commit(store, 1, **tensors)
    loaded = store.load_latest()
    for key, value in tensors.items():
        assert loaded.tensors[key].dtype == value.dtype and loaded.tensors[key].shape == value.shape
        assert np.array_equal(loaded.tensors[key], value)
    assert loaded.state == {"n": 1}


def test_shards_are_safetensors_files_written_without_copying_the_arrays():
    """Our zero-copy encoder writes what safetensors itself reads, for every dtype it maps and odd shapes."""
    from safetensors.numpy import load

    from cluster_trainer.checkpoint.format import safetensors_parts

    tensors = {
        f"{dtype}/{shape}": (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
        for dtype in ["float64", "float32", "float16", "int64", "uint64", "int32", "uint32", "int16", "uint16",
                      "int8", "uint8", "bool"]
        for shape in [(), (0,), (5,), (2, 0, 3), (3, 4)]
    }
    parts = safetensors_parts(tensors)
    assert len(parts) == len(tensors) + 1  # the header, then each array's own memory
    matrix = tensors["float32/(3, 4)"]
    assert any(np.shares_memory(np.frombuffer(part, np.uint8), matrix) for part in parts[1:] if len(part))
    data = b"".join(parts)
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0  # the data starts 8-byte aligned, as safetensors writes it
    loaded = load(data)
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape and np.array_equal(loaded[key], value)
    assert load(b"".join(safetensors_parts({}))) == {}


def test_restored_tensors_are_read_only_views_of_the_shard_and_a_bad_header_is_a_clear_error():
    from cluster_trainer.checkpoint.format import read_safetensors, safetensors_parts

    data = b"".join(safetensors_parts({"w": np.arange(6, dtype="float32").reshape(2, 3), "s": np.array(3, "int64")}))
    tensors = read_safetensors(data, "shard")
    assert np.shares_memory(tensors["w"], np.frombuffer(data, np.uint8)) and not tensors["w"].flags.writeable
    assert tensors["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["s"].shape == () and tensors["s"] == 3
    with pytest.raises(CheckpointError, match="shard: not a readable safetensors file"):
        read_safetensors(data[:-4], "shard")
    with pytest.raises(CheckpointError, match="shard: not a readable safetensors file"):
        read_safetensors(b"\xff" * 12, "shard")


def test_a_dtype_outside_the_encoder_falls_back_to_safetensors_own_writer():
    from safetensors.numpy import load

    from cluster_trainer.checkpoint.format import safetensors_parts

    big_endian = np.arange(4, dtype=">f4")
    parts = safetensors_parts({"be": big_endian, "w": np.ones(2, "float32")})
    assert len(parts) == 1
    assert np.array_equal(load(parts[0])["be"], big_endian)


def test_a_manifest_with_sha256_checksums_from_earlier_versions_still_verifies(store, tmp_path):
    import hashlib

    name = commit(store, 1, w=np.arange(4, dtype="float32"))
    manifest_path = tmp_path / "run" / "checkpoints" / name / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        data = (manifest_path.parent / entry["name"]).read_bytes()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        del entry["crc32"]
    manifest_path.write_text(json.dumps(manifest))
    assert np.array_equal(store.load_latest().tensors["w"], np.arange(4, dtype="float32"))
    shard = manifest_path.parent / manifest["tensors"]["w"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")  # same size, one byte changed
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        store.load_latest()


def test_shards_are_bounded_and_a_tensor_larger_than_a_shard_is_split_and_joined(store):
    big = np.arange(100, dtype="float32").reshape(25, 4)  # 400 bytes, shard bound 64
    commit(store, 1, a=np.zeros(10, "float32"), b=np.ones(10, "float32"), big=big)
    loaded = store.load_latest()
    shard_files = {f for f in loaded.manifest["tensors"].values()}
    assert len(shard_files) > 3
    for entry in loaded.manifest["files"]:
        if entry["name"].endswith(".safetensors"):
            assert entry["size"] < 64 + 200  # tensor bytes within the bound, plus the safetensors header
    assert any("@@part/" in key for key in loaded.manifest["tensors"])
    assert loaded.tensors["big"].dtype == big.dtype and np.array_equal(loaded.tensors["big"], big)
    assert sorted(loaded.tensors) == ["a", "b", "big"]


def test_a_checkpoint_without_manifest_does_not_exist(store):
    commit(store, 1, w=np.ones(2, "float32"))
    name = commit(store, 2, w=np.full(2, 2.0, "float32"))
    store.storage.remove(f"checkpoints/{name}/MANIFEST.json")  # as if killed before the commit
    assert store.load_latest().state == {"n": 1}


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "delete"])
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint_naming_the_object(store, damage, caplog):
    commit(store, 1, w=np.ones(4, "float32"))
    name = commit(store, 2, w=np.full(4, 2.0, "float32"))
    shard = store.storage.path(f"checkpoints/{name}/shard-00000.safetensors")
    data = bytearray(open(shard, "rb").read())
    if damage == "bit_flip":
        data[-1] ^= 0x01
        open(shard, "wb").write(data)
    elif damage == "truncate":
        open(shard, "wb").write(data[:-3])
    else:
        store.storage.remove(f"checkpoints/{name}/shard-00000.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = store.load_latest()
    assert loaded.state == {"n": 1}
    assert shard in caplog.text
    assert store.storage.exists(f"checkpoints/{name}/MANIFEST.json"), "evidence of corruption must be kept"


def test_all_checkpoints_corrupt_is_an_error_and_deletes_nothing(store, tmp_path):
    name = commit(store, 1, w=np.ones(4, "float32"))
    store.storage.put(f"checkpoints/{name}/state.json", b'{"n": 9}')  # same size, other bytes
    files_before = sorted(p for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(CheckpointError, match="no usable checkpoint.*checksum mismatch.*Nothing was deleted"):
        store.load_latest()
    assert sorted(p for p in (tmp_path / "run").rglob("*")) == files_before


def test_a_manifest_naming_a_path_outside_the_checkpoint_is_refused(store):
    name = commit(store, 1, w=np.ones(4, "float32"))
    manifest_path = f"checkpoints/{name}/MANIFEST.json"
    manifest = json.loads(store.storage.get(manifest_path))
    manifest["files"][0]["name"] = "../../../etc/passwd"
    store.storage.put(manifest_path, json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        store.read(name)


def test_retention_keeps_the_newest_and_commits_in_sequence_order(tmp_path):
    store = CheckpointStore(Storage(str(tmp_path / "run")), Retention(keep_last=2))
    names = [commit(store, i, w=np.full(1, i, "float32")) for i in range(1, 6)]
    assert store.committed() == [names[4], names[3]]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == sorted(names[3:])


def test_same_step_twice_gets_two_checkpoints(store):
    """The last batch of an epoch and the end of that epoch share a global step."""
    first = store.commit(sequence=1, step=16, attempt=1, tensors={}, state={"phase": "before validation"})
    second = store.commit(sequence=2, step=16, attempt=1, tensors={}, state={"phase": "epoch end"})
    assert first != second
    assert store.load_latest().state == {"phase": "epoch end"}
