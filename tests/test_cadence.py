"""The checkpoint cadence: the pacing policy as plain code, and runs that pace themselves.

The policy (`choose_interval`, `Cadence`) is tested in this process with a
clock of the test's own, no TensorFlow. The end-to-end test trains a model
whose state is large enough for saves to matter, once on local disk and once on
S3 behind a proxy that slows every request, with `every_steps="auto"`.
"""

import dataclasses
import math
import re
import time

import numpy as np
import pytest

from cluster_trainer.cadence import (
    FIRST_SAVE_STEPS,
    HEADROOM,
    Cadence,
    Measurements,
    choose_interval,
    describe_state,
)
from cluster_trainer.checkpoint.store import CommitReport
from cluster_trainer.deadlines import FlushDeadline, Window, late_notice_warning, notice_windows
from cluster_trainer.job import CheckpointPolicy
from cluster_trainer.on_ray.notices import DRAIN_LEAD_SECONDS, drain_is_far

BUDGET = 0.03
FAST = Measurements(step_seconds=0.02, save_seconds=0.012, commit_seconds=0.05, uptime_seconds=5.0)


# -- the decision ---------------------------------------------------------------------------------


def test_the_interval_is_the_smallest_whose_saves_stay_under_the_budget():
    interval = choose_interval(FAST, BUDGET)
    assert interval.reason == "budget"
    overhead = lambda steps: FAST.save_seconds / (steps * FAST.step_seconds)  # noqa: E731
    assert overhead(interval.steps) <= BUDGET * HEADROOM
    assert overhead(interval.steps - 1) > BUDGET * HEADROOM
    assert choose_interval(FAST, 2 * BUDGET).steps < interval.steps  # a larger budget saves more often


def test_a_store_the_writer_cannot_keep_up_with_lengthens_the_interval():
    slow = dataclasses.replace(FAST, commit_seconds=3.0)
    interval = choose_interval(slow, BUDGET)
    assert interval.reason == "writer" and "a commit takes 3.0 s on this store" in interval.why
    assert interval.steps * FAST.step_seconds >= 3.0  # the previous commit is done before the next is queued
    assert choose_interval(dataclasses.replace(slow, max_in_flight=2), BUDGET).steps < interval.steps


def test_a_bigger_model_saves_less_often():
    bigger = dataclasses.replace(FAST, save_seconds=0.1, step_seconds=0.05)
    assert choose_interval(bigger, BUDGET).steps * 0.05 > choose_interval(FAST, BUDGET).steps * 0.02


def test_young_daly_from_the_runs_own_interruptions_is_bounded_by_the_budget():
    day = dataclasses.replace(FAST, uptime_seconds=86400.0)
    calm = choose_interval(day, BUDGET)
    assert calm.reason == "Young-Daly" and "no interruption without notice yet" in calm.why
    assert calm.steps == math.ceil(math.sqrt(2 * 0.012 * 86400) / 0.02)
    stormy = choose_interval(dataclasses.replace(day, interruptions=99), BUDGET)  # one every 14 minutes
    assert stormy.steps == math.ceil(math.sqrt(2 * 0.012 * 864) / 0.02) and "99 interruptions" in stormy.why
    assert stormy.steps < calm.steps
    constant = dataclasses.replace(day, interruptions=86400)  # one a second: never past the budget
    assert choose_interval(constant, BUDGET) == choose_interval(dataclasses.replace(FAST, uptime_seconds=0), BUDGET)


def test_nothing_measured_means_a_first_save_a_few_steps_in():
    interval = choose_interval(Measurements(), BUDGET)
    assert (interval.steps, interval.reason) == (FIRST_SAVE_STEPS, "first save")


# -- the cadence of a run -----------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def report(seconds: float, nbytes: int = 25_000_000, prune: float = 0.0) -> CommitReport:
    return CommitReport("c", nbytes, {"shards": seconds - prune - 0.01, "manifest": 0.01, "prune": prune})


def run_steps(cadence: Cadence, clock: Clock, start: int, stop: int, step_seconds: float, save_seconds: float,
              commit_seconds: float, busy_extra: float = 0.0) -> list[int]:
    """Steps `start+1..stop` of `step_seconds` (`busy_extra` more while a commit is in flight); the saves `due`
    asks for cost `save_seconds` and commit in `commit_seconds` in the background. Returns the steps saved at."""
    saved, in_flight = [], []
    for step in range(start + 1, stop + 1):
        busy = bool(in_flight)
        seconds = step_seconds + (busy_extra if busy else 0.0)
        clock.now += seconds
        cadence.step_done(seconds, busy=busy)
        for done in [t for t in in_flight if t <= clock.now]:
            in_flight.remove(done)
            cadence.committed(report(commit_seconds))
        if cadence.due(step, len(in_flight)):
            clock.now += save_seconds
            cadence.saved(step, save_seconds)
            in_flight.append(clock.now + commit_seconds)
            saved.append(step)
    return saved


def test_a_run_paces_itself_and_says_why_when_the_interval_changes():
    clock, said = Clock(), []
    cadence = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock, echo=said.append)
    cadence.begin(attempt=1, global_step=0)
    saved = run_steps(cadence, clock, 0, 400, step_seconds=0.02, save_seconds=0.012, commit_seconds=0.05)
    assert saved[0] == FIRST_SAVE_STEPS
    gaps = [b - a for a, b in zip(saved[1:], saved[2:])]
    assert set(gaps) == {25}, saved  # 0.012 s / (0.8 * 3%) = 0.5 s = 25 steps of 0.02 s
    assert said == [f"checkpoints {choose_interval(cadence.measurements(), BUDGET).describe()}"]
    assert cadence.overhead() <= BUDGET

    # The store slows down: the writer bound takes over, and the change is said once.
    saved = run_steps(cadence, clock, 400, 1400, step_seconds=0.02, save_seconds=0.012, commit_seconds=2.0)
    assert cadence.interval.reason == "writer" and len(said) == 2 and "a commit takes" in said[1]
    assert all(b - a >= 100 for a, b in zip(saved[1:], saved[2:])), saved  # 2 s commits: no save queues behind one


def test_steps_slowed_down_while_a_commit_uploads_count_in_what_a_save_costs():
    clock = Clock()
    quiet = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)
    quiet.begin(attempt=1, global_step=0)
    run_steps(quiet, clock, 0, 3000, step_seconds=0.02, save_seconds=0.012, commit_seconds=0.2)
    shared = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)  # the writer slows steps by half
    shared.begin(attempt=1, global_step=0)
    run_steps(shared, clock, 0, 3000, step_seconds=0.02, save_seconds=0.012, commit_seconds=0.2, busy_extra=0.01)
    # A 0.2 s commit overlaps 7 steps of 30 ms, each 10 ms slower than the steps before it.
    assert shared.measurements().slowdown_seconds == pytest.approx(7 * 0.01)
    assert shared.interval.steps > 3 * quiet.interval.steps
    assert "of slower steps while it uploads" in shared.interval.why
    assert quiet.overhead() <= BUDGET and shared.overhead() <= BUDGET


def test_a_machine_that_gets_busier_for_every_step_is_not_taken_for_a_slowdown_by_commits():
    clock = Clock()
    cadence = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)
    cadence.begin(attempt=1, global_step=0)
    run_steps(cadence, clock, 0, 1500, step_seconds=0.02, save_seconds=0.012, commit_seconds=0.2)
    run_steps(cadence, clock, 1500, 4000, step_seconds=0.04, save_seconds=0.012, commit_seconds=0.2)  # more load
    assert cadence.measurements().slowdown_seconds == 0.0 and cadence.measurements().step_seconds == 0.04


def test_a_save_due_while_the_writer_is_busy_waits_instead_of_blocking_training():
    clock = Clock()
    cadence = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)
    cadence.begin(attempt=1, global_step=0)
    assert cadence.due(FIRST_SAVE_STEPS, in_flight=0) and not cadence.due(FIRST_SAVE_STEPS, in_flight=1)
    fixed = Cadence(CheckpointPolicy(every_steps=8))
    assert [fixed.due(step, in_flight=1) for step in (7, 8, 16)] == [False, True, True]  # fixed: as asked


def test_a_save_that_would_still_be_uploading_at_the_epoch_end_commit_is_left_to_it():
    clock = Clock()
    cadence = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)
    cadence.begin(attempt=1, global_step=0)
    run_steps(cadence, clock, 0, 10, step_seconds=0.02, save_seconds=0.012, commit_seconds=1.0)
    clock.now += 2.0
    cadence.committed(report(1.0))
    step = cadence.last_commit_step + 100  # past the writer bound: 1.25 * 1.0 s = 63 steps of 0.02 s
    assert cadence.due(step, epoch_commit_in=None) and cadence.due(step, epoch_commit_in=70)  # 1.4 s > 1.25 s
    assert not cadence.due(step, epoch_commit_in=60)  # 1.2 s: the epoch-end commit would wait for this one


def test_what_an_attempt_measured_is_where_the_next_one_starts():
    clock, said = Clock(), []
    first = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock)
    first.begin(attempt=1, global_step=0)
    run_steps(first, clock, 0, 300, step_seconds=0.02, save_seconds=0.012, commit_seconds=0.05)
    stored = first.state()

    second = Cadence(CheckpointPolicy(every_steps="auto"), clock=clock, echo=said.append)
    second.begin(attempt=2, global_step=280, stored=stored, resumed_attempt=1, resumed_finished=False)
    assert second.interruptions == 1 and second.notices == 0  # the first attempt was killed after step 280
    assert second.interval.reason != "first save" and said[0].endswith("(measured by earlier attempts)")
    assert not second.due(280 + FIRST_SAVE_STEPS) and second.due(280 + second.interval.steps)
    assert second.uptime_seconds() == pytest.approx(stored["uptime_seconds"])
    assert [a["attempt"] for a in second.state()["attempts"]] == [1, 2]


def test_interruptions_are_counted_from_the_attempts_and_the_checkpoint_they_resumed_from():
    def resumed(stored, attempt, resumed_attempt, finished=False):
        cadence = Cadence(CheckpointPolicy(every_steps="auto"))
        cadence.begin(attempt, 100, stored=stored, resumed_attempt=resumed_attempt, resumed_finished=finished)
        return cadence.interruptions, cadence.notices

    assert resumed({"interruptions": 2, "notices": 1, "flush": True}, 5, 4) == (2, 2)  # a flush: with notice
    assert resumed({"interruptions": 2, "notices": 1, "flush": False}, 5, 4) == (3, 1)  # killed after its commit
    assert resumed({"flush": True}, 7, 4) == (2, 1)  # attempts 5 and 6 never committed: killed too
    assert resumed({"interruptions": 2}, 5, 4, finished=True) == (2, 0)  # a finished run extended: none


def test_a_damaged_cadence_state_is_ignored_not_trusted():
    damaged = {"uptime_seconds": float("nan"), "interruptions": -3, "step_seconds": "fast", "save_seconds": 1e400,
               "commit_seconds": True, "attempts": "many", "interval": {"steps": "x"}, "windows": [None, 3]}
    cadence = Cadence(CheckpointPolicy(every_steps="auto"))
    cadence.begin(attempt=2, global_step=10, stored=damaged, resumed_attempt=1, resumed_finished=False)
    assert cadence.measurements().save_seconds is None and cadence.interval.reason == "first save"
    assert cadence.uptime_before == 0 and cadence.interruptions == 1
    assert describe_state(damaged) == []


# -- a flush against the notice windows --------------------------------------------------------------


def test_a_flush_too_long_for_a_window_is_said_once_with_the_numbers_and_the_fix():
    windows = notice_windows(15.0, [])
    deadline = FlushDeadline(windows)
    message = deadline.check(34.1, 4_100_000_000, 120e6)
    assert message.startswith("warning: a flush of 4.1 GB would take ~34.1 s at the measured 120 MB/s; "
                              "the grace period (CLUSTER_TRAINER_GRACE_SECONDS) gives 15 s: raise it")
    assert "terminationGracePeriodSeconds" in message and "GKE >= 1.35" in message
    assert deadline.check(36.0, 4_100_000_000, 114e6) is None  # the same verdict: said once
    assert deadline.check(60.0, 4_100_000_000, 68e6).startswith("warning: a flush of 4.1 GB would take ~60.0 s")
    assert deadline.check(2.0, 4_100_000_000, 2e9).startswith("a flush fits the notice windows again")
    assert FlushDeadline(windows).check(2.0, 4_100_000_000, 2e9) is None  # fits from the start: nothing said


def test_each_notice_source_brings_its_platforms_window_where_it_is_shorter_than_the_grace_period():
    from cluster_trainer.preemption import AwsSpotNotice, GceMetadataNotice

    sources = [GceMetadataNotice(host="127.0.0.1:9"), AwsSpotNotice(endpoint="http://127.0.0.1:9")]
    assert [(w.name, w.seconds) for w in notice_windows(60.0, sources)] == [
        ("the grace period (CLUSTER_TRAINER_GRACE_SECONDS)", 60.0), ("GCE spot preemption", 30.0)]
    message = FlushDeadline(notice_windows(300.0, sources)).check(150.0, 10**10, 7e7)
    assert "GCE spot preemption gives 30 s" in message and "EC2 spot interruption gives 120 s" in message


def test_a_notice_closer_than_a_flush_says_so_and_still_commits():
    assert late_notice_warning(3.0, 9.5, "c00000004-s0000000040-a0001").startswith(
        "warning: 3.0 s to the deadline and a flush takes ~9.5 s here: committing anyway")
    assert late_notice_warning(30.0, 9.5, None) is None and late_notice_warning(3.0, None, None) is None


def test_a_run_says_at_the_step_after_its_first_measured_commit_that_a_flush_does_not_fit_and_only_once():
    said = []
    cadence = Cadence(CheckpointPolicy(every_steps="auto"), windows=notice_windows(0.5), echo=said.append)
    cadence.begin(attempt=1, global_step=0)
    for _ in range(3):
        cadence.step_done(0.1)
    cadence.committed(report(2.0, nbytes=50_000_000))  # on the writer's thread
    assert said == []
    cadence.step_done(0.1)
    assert len(said) == 1 and said[0].startswith("warning: a flush of 50.0 MB would take ~2.1 s at the measured 25.0 MB/s")
    cadence.committed(report(2.1, nbytes=50_000_000))
    cadence.step_done(0.1)
    assert len(said) == 1


def test_the_flush_estimate_comes_from_the_measured_commits_without_pruning():
    cadence = Cadence(CheckpointPolicy(every_steps=8), windows=[Window("GKE spot", 1.0, "raise it")])
    cadence.begin(attempt=1, global_step=0)
    assert cadence.flush_estimate() is None
    for _ in range(3):
        cadence.step_done(0.1)
    cadence.committed(report(2.5, nbytes=50_000_000, prune=0.5))  # a flush does not prune: 2.0 s
    seconds, nbytes, rate = cadence.flush_estimate()
    assert seconds == pytest.approx(2.1) and nbytes == 50_000_000 and rate == pytest.approx(25e6)
    lines = describe_state(cadence.state())
    assert lines[0] == "saves      every 8 steps: CheckpointPolicy(every_steps=8)"
    assert lines[1] == "flush      ~2.1 s for 50.0 MB (measured), longer than GKE spot (1 s)"


# -- a Ray drain far away ------------------------------------------------------------------------------------


def test_a_far_drain_deadline_is_first_a_warning_then_the_notice_when_a_flush_would_only_just_fit():
    assert drain_is_far(600.0, flush_seconds=5.0)
    assert not drain_is_far(DRAIN_LEAD_SECONDS + 2 * 5.0, flush_seconds=5.0)  # now: commit and stop
    assert not drain_is_far(DRAIN_LEAD_SECONDS, flush_seconds=0.1)  # Ray's default drain is a notice at once
    assert not drain_is_far(3600.0, flush_seconds=None)  # nothing measured: no risk taken


# -- end to end ------------------------------------------------------------------------------------------------


STEPS = 500
ACCELERATOR_STEP = 0.02


def _job():
    """A head over a frozen embedding (a 1.3 MB state, a save of a few ms) whose steps also wait 20 ms, as a
    step on an accelerator leaves the host's CPU free: the writer then shares the CPU with little else, as on
    a GPU node, and the test costs little CPU on a busy machine. No epoch-end saves: the budget is the cadence's."""
    import keras

    import cluster_trainer as ct

    class Accelerator(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(ACCELERATOR_STEP)

    def build(config):
        model = keras.Sequential([keras.Input((8,), dtype="int32"), keras.layers.Embedding(5000, 64, trainable=False),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(16)])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5000, size=(32 * STEPS, 8)).astype("int32")
    y = rng.normal(size=(32 * STEPS, 16)).astype("float32")
    return ct.Job(name="embedding", build_model=build, train_data=(x, y), epochs=1, batch_size=32,
                  callbacks=lambda config: [Accelerator()],
                  checkpoint=ct.CheckpointPolicy(every_steps="auto", every_epoch=False, keep_last=1))


@pytest.mark.slow
def test_auto_saves_less_often_on_a_slow_store_more_often_on_local_disk_and_within_the_budget(s3, tmp_path,
                                                                                               monkeypatch):
    import cluster_trainer as ct
    from cluster_trainer.devices import make_strategy
    from faulty_proxy import FaultyProxy

    strategy = make_strategy(None)
    job = _job()
    fast_said: list[str] = []
    fast = ct.train(job, str(tmp_path / "fast"), strategy=strategy, verbose=0, echo=fast_said.append,
                    handle_signals=False)

    proxy = FaultyProxy(s3.endpoint, latency_seconds=0.3)  # every request to the store waits 0.3 s
    monkeypatch.setenv("CLUSTER_TRAINER_GRACE_SECONDS", "0.5")  # a window no flush to that store fits in
    slow_said: list[str] = []
    try:
        slow = ct.train(job, s3.uri(), strategy=strategy, verbose=0, echo=slow_said.append, handle_signals=False,
                        storage_options={"endpoint_url": proxy.endpoint})
    finally:
        proxy.stop()

    fast_stats, slow_stats = fast.checkpoint_stats, slow.checkpoint_stats
    summary = f"fast {fast_stats}, slow {slow_stats}\n" + "\n".join(fast_said + slow_said)
    assert fast.position.global_step == slow.position.global_step == STEPS, summary
    assert slow_stats["interval"] > fast_stats["interval"] and slow_stats["saves"] < fast_stats["saves"], summary
    assert any("checkpoints every" in m and "a commit takes" in m for m in slow_said), summary  # the writer bound
    # Large enough for saves to matter: saving after every step would cost more than the budget ...
    assert fast_stats["host_copy_median_seconds"] > BUDGET * fast_stats["step_seconds"], summary
    # ... and the run kept what saves cost training (its thread, and steps slowed by uploads) under it. (Not the
    # slow run: its store and proxy run in this process and slow its steps while a commit uploads; it measures
    # that after its first commits, in a run too short to make up for them.)
    assert fast_stats["overhead"] <= BUDGET, summary
    # A flush to the slow store does not fit a 0.5 s grace period: the run says so, and again only when the
    # flush has grown by half; locally, 30 s is plenty and nothing is said.
    warnings = [m for m in slow_said if m.startswith("warning: a flush of")]
    assert warnings and all("the grace period (CLUSTER_TRAINER_GRACE_SECONDS) gives 0.5 s" in m for m in warnings)
    flushes = [float(re.search(r"would take ~([\d.]+) s", m)[1]) for m in warnings]
    assert all(later >= 1.5 * earlier for earlier, later in zip(flushes, flushes[1:])), summary
    assert not [m for m in fast_said if "flush" in m], summary
