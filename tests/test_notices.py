"""Preemption notices from cloud metadata servers, files, and at awkward moments.

The metadata servers are real HTTP servers on loopback that answer like GCE's
and EC2's (IMDSv2: a session token first); the runs are real processes.
"""

import contextlib
import re
import time

import fsspec
import pyarrow.parquet as pq
import pytest

from bench.imds import MetadataServer
from cluster_trainer.preemption import AwsSpotNotice, FileNotice, GceMetadataNotice, PreemptionWatcher, notice_sources
from cluster_trainer.errors import ConfigError
from faulty_proxy import FaultyProxy
from harness import assert_bitwise_equal_runs, cli, latest, start_training, train_cmd, wait_until
from cluster_trainer.checkpoint import CheckpointStore
from cluster_trainer.history import read_history
from cluster_trainer.storage import Storage

EXIT_PREEMPTED = 75


@pytest.fixture
def metadata():
    server = MetadataServer()
    yield server
    server.stop()


@contextlib.contextmanager
def _killed_unless_exited(process):
    """Whatever fails in the block, the training process does not outlive it."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _seen_within(watcher: PreemptionWatcher, server: MetadataServer, limit: float) -> float:
    watcher.start(handle_signals=False)
    try:
        time.sleep(2 * watcher.poll_seconds)
        assert watcher.notice is None, "a notice before the server raised one"
        server.preempt()
        raised = time.monotonic()
        while watcher.notice is None and time.monotonic() - raised < limit + 5:
            time.sleep(0.01)
        assert watcher.notice is not None, "no notice seen"
        return watcher.notice.received_at - raised
    finally:
        watcher.stop()


def test_gce_metadata_notice_is_seen_within_one_poll_interval(metadata):
    watcher = PreemptionWatcher([GceMetadataNotice(host=metadata.host)], grace_seconds=25, poll_seconds=0.2)
    took = _seen_within(watcher, metadata, 0.2)
    assert took <= 0.2 + 0.15, f"seen {took:.2f}s after the server raised it"
    assert watcher.notice.source == "GCE metadata"
    assert 24 < watcher.notice.seconds_left() <= 25  # GCE gives no deadline: the grace period applies
    assert "GET /computeMetadata/v1/instance/preempted" in metadata.requests


def test_aws_spot_notice_uses_imdsv2_and_takes_the_deadline_from_the_instance_action(metadata):
    watcher = PreemptionWatcher([AwsSpotNotice(endpoint=f"http://{metadata.host}")], grace_seconds=300,
                                poll_seconds=0.2)
    took = _seen_within(watcher, metadata, 0.2)
    assert took <= 0.2 + 0.15, f"seen {took:.2f}s after the server raised it"
    assert 110 < watcher.notice.seconds_left() <= 121  # two minutes, from the "time" field (whole seconds)
    assert metadata.requests[0] == "PUT /latest/api/token"
    assert metadata.requests.count("PUT /latest/api/token") == 1  # the session token is reused


def test_a_deadline_later_than_the_grace_period_is_capped_at_it(metadata):
    watcher = PreemptionWatcher([AwsSpotNotice(endpoint=f"http://{metadata.host}")], grace_seconds=30,
                                poll_seconds=0.2)
    _seen_within(watcher, metadata, 0.2)
    assert 29 < watcher.notice.seconds_left() <= 30


def test_an_ec2_rebalance_recommendation_is_an_early_warning_reported_once_and_not_a_notice(metadata):
    watcher = PreemptionWatcher([AwsSpotNotice(endpoint=f"http://{metadata.host}")], grace_seconds=300,
                                poll_seconds=0.1)
    watcher.start(handle_signals=False)
    try:
        time.sleep(0.3)
        assert watcher.take_warnings() == []
        metadata.rebalance = "2026-12-01T10:00:00Z"
        warnings = []
        wait_until(lambda: warnings.extend(watcher.take_warnings()) or warnings, "the early warning", timeout=10)
        time.sleep(0.5)  # the recommendation stands through several more polls
        warnings += watcher.take_warnings()
        assert [(w.source, w.reason) for w in warnings] == [
            ("AWS spot instance-action", "EC2 rebalance recommendation of 2026-12-01T10:00:00Z")]
        assert watcher.notice is None  # training goes on
        metadata.preempt()  # the interruption notice that follows
        wait_until(lambda: watcher.notice is not None, "the notice", timeout=10)
    finally:
        watcher.stop()
    assert "GET /latest/meta-data/events/recommendations/rebalance" in metadata.requests


def test_a_gce_live_migration_is_an_early_warning_and_a_terminating_maintenance_a_notice(metadata):
    source = GceMetadataNotice(host=metadata.host)
    assert source.poll() is None and source.poll_warning() is None
    metadata.maintenance = "MIGRATE_ON_HOST_MAINTENANCE"
    assert source.poll() is None
    assert source.poll_warning() == "maintenance-event MIGRATE_ON_HOST_MAINTENANCE (a live migration within 60 s)"
    metadata.maintenance = "TERMINATE_ON_HOST_MAINTENANCE"
    assert source.poll() == float("inf") and source.poll_warning() is None
    metadata.maintenance, metadata.preempted = "NONE", True
    assert source.poll() == float("inf")


def test_a_file_notice_reads_its_deadline_from_the_file(tmp_path):
    source = FileNotice(str(tmp_path / "preempt"))
    assert source.poll() is None
    (tmp_path / "preempt").write_text("12.5\n")
    assert source.poll() == 12.5
    (tmp_path / "preempt").write_text("")
    assert source.poll() == float("inf")


def test_an_unknown_notice_source_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown notice source 'azure': use gce, aws or file:PATH"):
        notice_sources(["azure"])
    result = cli(*train_cmd("unused", "--notice", "file"))
    assert result.returncode == 2 and "unknown notice source 'file'" in result.stderr


def _flushed_position(output: str) -> tuple[int, int, int]:
    committed = re.search(r"committing at epoch (\d+), batch (\d+) \(global step (\d+)\)", output)
    assert committed, output
    epoch, batch, step = (int(g) for g in committed.groups())
    return epoch - 1, batch, step


@pytest.mark.slow
def test_a_metadata_notice_flushes_the_run_at_a_batch_boundary(metadata, mlp_reference, tmp_path):
    # GCE's notice here; EC2's instance-action ends the rebalance test below the same way.
    storage = tmp_path / "run"
    env = {"GCE_METADATA_HOST": metadata.host, "CT_TEST_STEP_SLEEP": "0.03", "CLUSTER_TRAINER_GRACE_SECONDS": "20"}
    process, log = start_training(storage, "--notice", "gce", **env)
    with _killed_unless_exited(process):
        metadata.preempt()
        process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == EXIT_PREEMPTED, output
    assert "preemption notice (GCE metadata)" in output
    epoch, batch, step = _flushed_position(output)
    position = latest(storage).state["position"]
    assert (position["epoch"], position["batch"], position["global_step"]) == (epoch, batch, step)
    assert 0 < step < 144

    resumed = cli(*train_cmd(storage))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(global step {step}), attempt 2" in resumed.stderr  # zero steps re-run
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))


def _preempted_run(storage, **env) -> str:
    result = cli(*train_cmd(storage), **env)
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_a_notice_during_validation_commits_at_the_end_of_that_epoch(mlp_reference, tmp_path):
    storage = tmp_path / "run"
    output = _preempted_run(storage, CT_TEST_NOTICE_AT="test_begin:16")
    # Validation of epoch 0 finishes and its row is committed; the run resumes at epoch 1, batch 0.
    assert _flushed_position(output) == (1, 0, 16)
    history = read_history(str(storage))
    assert list(history["epoch"]) == [0] and history["val_loss"].notna().all()
    resumed = cli(*train_cmd(storage))
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))
    assert list(read_history(str(storage))["epoch"]) == list(read_history(str(mlp_reference))["epoch"])


@pytest.mark.slow
def test_a_notice_during_a_checkpoint_upload_waits_for_it_then_commits_the_next_batch(s3, mlp_reference, tmp_path):
    """A slow store keeps the step-8 upload in flight when the notice comes at the start of step 9."""
    proxy = FaultyProxy(s3.endpoint, latency_seconds=0.15, seed=9)
    uri = s3.uri()
    try:
        output = _preempted_run(uri, AWS_ENDPOINT_URL_S3=proxy.endpoint, CT_TEST_EVERY_STEPS="8",
                                CT_TEST_NOTICE_AT="train_batch_begin:8")
        assert _flushed_position(output) == (0, 9, 9)
        assert re.search(r"checkpoint \d+ waited \d+\.\d+s for the previous upload to finish", output), output
        store = CheckpointStore(Storage(uri))
        steps = sorted(int(name.split("-s")[1].split("-")[0]) for name in store.committed())
        assert steps[-2:] == [8, 9], steps  # the upload in flight was finished, not dropped
    finally:
        proxy.stop()
    resumed = cli(*train_cmd(uri))  # the rest of the run, without the slow proxy: what it tested is done
    assert resumed.returncode == 0, resumed.stderr
    # botocore's retry jitter draws from Python's global random: compare the rest.
    assert_bitwise_equal_runs(latest(mlp_reference), latest(uri), python_rng=False)
    # The history is plain Parquet on the bucket, for pandas and pyarrow without cluster-trainer.
    with fsspec.open(f"{uri}/history/epochs.parquet") as f:
        on_bucket = pq.ParquetFile(f).read().to_pandas()
    assert on_bucket.equals(read_history(uri)) and list(on_bucket["epoch"]) == list(range(len(on_bucket)))
    assert on_bucket["resumed"].sum() == 1 and on_bucket["attempt"].max() == 2


@pytest.mark.slow
def test_a_second_notice_neither_moves_the_deadline_nor_commits_twice(mlp_reference, tmp_path):
    storage = tmp_path / "run"
    output = _preempted_run(storage, CT_TEST_NOTICE_AT="train_batch_begin:20", CT_TEST_NOTICE_COUNT="2")
    assert output.count("preemption notice (SIGTERM)") == 1
    assert _flushed_position(output) == (1, 5, 21)
    resumed = cli(*train_cmd(storage))
    assert resumed.returncode == 0, resumed.stderr
    assert "(global step 21), attempt 2" in resumed.stderr
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))


@pytest.mark.slow
def test_an_ec2_rebalance_recommendation_saves_once_trains_on_and_the_notice_after_it_re_runs_no_step(
        metadata, mlp_reference, tmp_path):
    storage = tmp_path / "run"
    # Commits at epoch ends only, so that the save on the warning is the one commit besides them and the flush.
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{metadata.host}", "CT_TEST_STEP_SLEEP": "0.05",
           "CT_TEST_EVERY_STEPS": "100000"}
    process, log = start_training(storage, "--notice", "aws", **env)
    with _killed_unless_exited(process):
        metadata.rebalance = "2026-12-01T10:00:00Z"
        wait_until(lambda: "early warning" in log.read_text() or process.poll() is not None, "the early save")
        time.sleep(2.5)  # the recommendation stands, polled again and again; training goes on
        assert process.poll() is None, log.read_text()[-3000:]
        metadata.preempt()
        process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    early = re.findall(r"early warning \(AWS spot instance-action: EC2 rebalance recommendation of "
                       r"2026-12-01T10:00:00Z\): saving at epoch \d+, batch \d+ \(global step (\d+)\) and training on",
                       output)
    assert len(early) == 1, output[-3000:]
    epoch, batch, step = _flushed_position(output)
    assert int(early[0]) < step  # it trained on after the early save
    flush = latest(storage)
    epoch_ends = epoch if batch > 0 else epoch - 1  # a flush at an epoch's end takes the place of its commit
    assert flush.sequence == epoch_ends + 2, (flush.name, output[-3000:])  # + the early save + the flush
    assert flush.state["cadence"]["early_saves"] == 1 and flush.state["cadence"]["flush"] is True

    resumed = cli(*train_cmd(storage))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(global step {step}), attempt 2" in resumed.stderr  # zero steps re-run
    assert_bitwise_equal_runs(latest(mlp_reference), latest(storage))
