"""Object stores misbehave and processes die mid-upload: the run still ends bitwise equal.

Real servers on loopback (moto's S3, a fault-injecting proxy in front of it),
real processes, real signals.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from faulty_proxy import FaultyProxy
from harness import ROOT, assert_bitwise_equal_runs, cli, cli_env, latest, train_cmd

SHORT_TIMEOUTS = "config_kwargs={'read_timeout': 1, 'connect_timeout': 1}"


@pytest.mark.slow
def test_run_completes_bitwise_equal_through_503s_dropped_connections_and_timeouts(s3, mlp_reference):
    proxy = FaultyProxy(s3.endpoint, fail_rate=0.08, drop_rate=0.03, delay_rate=0.02, delay_seconds=2.5, seed=3)
    try:
        uri = s3.uri()
        result = cli(*train_cmd(uri, "--storage-option", SHORT_TIMEOUTS), AWS_ENDPOINT_URL_S3=proxy.endpoint,
                     CT_TEST_EVERY_STEPS="4")
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        proxy.stop()
    assert proxy.injected["503"] > 5 and proxy.injected["drop"] > 0 and proxy.injected["delay"] > 0, proxy.injected
    # botocore draws its retry jitter from Python's global `random` on the upload thread, so that one
    # piece of process state follows the faults; everything the model and callbacks hold must not.
    assert_bitwise_equal_runs(latest(mlp_reference), latest(uri), python_rng=False)


@pytest.mark.slow
def test_sigkill_at_random_moments_mid_upload_never_loads_a_torn_checkpoint(s3, mlp_reference):
    """A slow store widens the upload window; kills land in shard and manifest writes."""
    proxy = FaultyProxy(s3.endpoint, latency_seconds=0.01, seed=5)
    rng = random.Random(20261124)
    uri = s3.uri()
    env = dict(AWS_ENDPOINT_URL_S3=proxy.endpoint, CT_TEST_EVERY_STEPS="1")
    try:
        for kill in range(4):
            before = latest(uri).sequence if kill else 0
            process = subprocess.Popen([sys.executable, "-m", "cluster_trainer", *train_cmd(uri)], env=cli_env(**env),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and process.poll() is None:  # this attempt's first commit
                    try:
                        if latest(uri).sequence > before:
                            break
                    except AssertionError:
                        pass
                    time.sleep(0.1)
                time.sleep(rng.uniform(0.0, 1.5))
                assert process.poll() is None, f"attempt {kill + 1} exited ({process.returncode}) before the kill"
            finally:  # never leave a training process behind, whatever failed
                process.send_signal(signal.SIGKILL)
                process.wait()
            checkpoint = latest(uri)  # verifies sizes and checksums of everything it loads
            assert checkpoint.sequence > before
        result = cli(*train_cmd(uri), **env)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        proxy.stop()
    final = latest(uri)
    assert final.attempt == 5
    assert_bitwise_equal_runs(latest(mlp_reference), final)


@pytest.mark.slow
def test_a_zombie_attempt_never_commits_over_the_attempt_that_replaced_it(mlp_reference, tmp_path):
    storage = tmp_path / "run"
    zombie = subprocess.Popen([sys.executable, "-m", "cluster_trainer", *train_cmd(storage)],
                              env=cli_env(CT_TEST_EVERY_STEPS="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if latest(storage).step >= 20:
                    break
            except AssertionError:
                pass
            time.sleep(0.05)
        os.kill(zombie.pid, signal.SIGSTOP)  # the machine stops answering; a new process takes over

        replacement = cli(*train_cmd(storage), CT_TEST_EVERY_STEPS="1")
        assert replacement.returncode == 0, replacement.stderr
        assert "attempt 2" in replacement.stderr
        final = latest(storage)
    except BaseException:  # never leave a training process behind, whatever failed
        zombie.kill()
        zombie.wait()
        raise
    os.kill(zombie.pid, signal.SIGCONT)  # ... and the old one wakes up
    try:
        _, zombie_stderr = zombie.communicate(timeout=180)
    finally:
        if zombie.poll() is None:
            zombie.kill()
            zombie.wait()
    assert zombie.returncode == 3, zombie_stderr
    assert "superseded by attempt 2" in zombie_stderr
    assert latest(storage).name == final.name
    assert_bitwise_equal_runs(latest(mlp_reference), final)


@pytest.mark.parametrize("problem", ["missing bucket", "missing credentials"])
def test_store_problems_are_one_line_errors(problem, s3, tmp_path):
    env = {}
    uri = f"s3://no-such-bucket-{os.getpid()}/run"
    message = f"bucket 'no-such-bucket-{os.getpid()}' of {uri} does not exist: create it or fix the URI"
    if problem == "missing credentials":
        uri = s3.uri()
        env = dict(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   AWS_CONFIG_FILE=str(tmp_path / "none"))
        message = f"no credentials for {uri}"
    result = cli("status", uri, **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "testing" not in result.stderr  # a secret never appears
