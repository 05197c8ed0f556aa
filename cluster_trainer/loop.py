"""The resumable training loop: epochs and batches driven here, the step by Keras.

`model.fit` cannot start in the middle of an epoch, so this loop does what
`fit` does (Keras 3.15 `backend/tensorflow/trainer.py`), in the same order,
with one difference: it can begin at any `(epoch, batch)` and it commits
checkpoints between steps. The step itself is Keras's compiled
`train_function`/`test_function` under the job's MirroredStrategy, and the
callbacks are driven through `keras.callbacks.CallbackList`, so stock and user
callbacks see exactly the calls they would see in `fit`.

Resuming at batch `b` of epoch `e` means: the callbacks were already told
`on_epoch_begin(e)` and `on_train_batch_end(b - 1)` by the process that wrote the
checkpoint, so the resumed process calls neither again (the progress bar alone
is re-initialised), restores model, optimizer, metric and callback state, and
feeds batch `b` next. When `b` is the epoch's last batch, the next thing run is
validation.

On several workers (MultiWorkerMirroredStrategy) every worker runs this loop
on the same job: each feeds its own replicas their part of every global batch,
takes the decisions it cannot take alone at agreement points
(`cluster_trainer.agreement`), and joins every checkpoint's capture; the chief
(worker 0) alone registers the attempt and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import statistics
import sys
import time
import uuid
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from cluster_trainer import callback_state, keras_compat
from cluster_trainer.agreement import PEER_LOST_ERRORS, Agreement, Group, Vote, WorkerLostError, peer_lost_reason
from cluster_trainer.checkpoint import (
    Checkpoint, CheckpointStore, CheckpointWriter, SupersededError, checkpoint_name, register_attempt,
)
from cluster_trainer.checkpoint.format import parse_name
from cluster_trainer.data import as_source, replica_batches
from cluster_trainer.devices import enable_determinism, make_strategy, on_several_workers
from cluster_trainer.errors import CheckpointError, ConfigError, JobError
from cluster_trainer.history import HistoryRecorder
from cluster_trainer.job import Job, RunContext
from cluster_trainer.preemption import Notice, NoticeSource, PreemptedError, PreemptionWatcher, sources_from_environment
from cluster_trainer.state import (
    capture_model_state,
    capture_rng_state,
    check_model_fits,
    prepare_capture,
    restore_model_state,
    restore_rng_state,
    take_part_in_capture,
)
from cluster_trainer.run_files import RunFiles
from cluster_trainer.storage import Storage
from cluster_trainer.workers import Workers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Position:
    """Where the run is: the next batch to train is `batch` of `epoch`."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    stop_training: bool = False
    finished: bool = False
    # Train logs of the epoch so far, for an epoch resumed after its last batch
    # (the logs `fit` would carry from the last step into on_epoch_end).
    train_logs: dict | None = None


@dataclasses.dataclass
class RunResult:
    """What `train` returns: where the run ended and its epoch history."""

    uri: str
    status: str  # "completed" or "already_complete"
    attempt: int
    position: Position
    history: dict[str, list]
    checkpoint: str | None
    # saves, seconds spent copying state to host memory (in all, and the median save's), seconds
    # blocked on earlier uploads
    checkpoint_stats: dict = dataclasses.field(default_factory=dict)


def train(
    job: Job,
    storage: str,
    *,
    devices: int | None = None,
    epochs: int | None = None,
    verbose: int | str = "auto",
    strategy: tf.distribute.Strategy | None = None,
    storage_options: dict | None = None,
    echo: Callable[[str], None] | None = None,
    notice_sources: Sequence[NoticeSource] | None = None,
    handle_signals: bool = True,
    workers: Workers | None = None,
) -> RunResult:
    """Run `job` to the end, storing checkpoints under `storage`; resume if it holds one.

    In a multi-worker run every worker calls `train` with the same job and storage and its
    own `workers.index`; each returns a `RunResult`, and worker 0 (the chief) alone writes.

    Args:
        job: the `Job`.
        storage: the run's URI (local path, file://, memory://, gs://, s3://).
        devices: replicas for MirroredStrategy (default: all GPUs, else 1 CPU).
        epochs: override `job.epochs` (e.g. to extend a finished run).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, "auto".
        strategy: an existing strategy (overrides `devices`).
        storage_options: fsspec options for the store (e.g. `{"endpoint_url": ...}`); they
            override the job's `storage_options`.
        echo: where to print one-line run messages (default: stderr).
        notice_sources: polled preemption notice sources (default: those named in
            `CLUSTER_TRAINER_NOTICE`, e.g. "gce"); see `cluster_trainer.preemption`.
        handle_signals: treat SIGTERM/SIGINT as preemption notices (main thread only).
        workers: this process's place in a multi-worker run (`Workers(addresses, index)`), trained
            under MultiWorkerMirroredStrategy with `devices` replicas on each worker. Default: the
            workers `TF_CONFIG` names, when it names more than one; else a run in this process.

    Example:
        >>> result = train(load_job("jobs/mlp.py"), "runs/mlp")   # doctest: +SKIP
        >>> result.history["val_loss"][-1]                          # doctest: +SKIP
    """
    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    keras_compat.check_versions()
    if workers is None and strategy is None:
        workers = Workers.from_tf_config()
    if epochs is not None:
        job = dataclasses.replace(job, epochs=epochs)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    run_storage = Storage(storage, {**job.storage_options, **(storage_options or {})})
    run_storage.check()
    policy = job.checkpoint
    store = CheckpointStore(run_storage, policy.retention(), shard_bytes=policy.shard_mb * 2**20)
    strategy = strategy or make_strategy(devices, workers)
    if workers is None and on_several_workers(strategy):  # a MultiWorkerMirroredStrategy the caller made
        resolver = strategy.cluster_resolver
        workers = Workers(resolver.cluster_spec().as_dict()["worker"], resolver.task_id)
    group = Group(strategy, workers)
    if group.multi_worker:
        keras_compat.fix_multi_worker_step_reduction()
        echo = (lambda message, echo=echo: echo(f"worker {group.index}: {message}"))
    resume = _agreed_resume(group, store)
    if notice_sources is None:
        notice_sources = sources_from_environment()
    run = _Run(job, store, strategy, resume, verbose, echo, PreemptionWatcher(notice_sources), group)
    # A notice is cast at once, so that the step in flight can carry it to the other workers.
    run.preemption.listeners.append(lambda notice: group.cast(run._vote()))
    run.preemption.start(handle_signals=handle_signals)
    try:
        return run.run()
    except PEER_LOST_ERRORS as e:
        if not group.multi_worker:
            raise
        raise WorkerLostError(
            f"worker {group.index} lost the rest of its group ({type(e).__name__}: {peer_lost_reason(e)}); "
            "start every worker again: the run resumes from its last commit"
        ) from e
    finally:
        run.preemption.stop()
        run.writer.close()


def _agreed_resume(group: Group, store: CheckpointStore) -> Checkpoint | None:
    """The checkpoint every worker resumes from: the one the chief chose (None for a new run)."""
    chosen: list[Checkpoint | None] = []

    def choose() -> tuple[int, int, int]:
        chosen.append(store.load_latest())
        return (chosen[0].sequence, chosen[0].step, chosen[0].attempt) if chosen[0] else (0, 0, 0)

    sequence, step, attempt = (int(v) for v in group.from_chief(choose, 3))
    if group.is_chief:
        return chosen[0]
    return store.read(checkpoint_name(sequence, step, attempt)) if sequence else None


def build_compiled_model(job: Job, strategy: tf.distribute.Strategy, train_source) -> keras.Model:
    """Call the job's `build_model` in the strategy's scope and create every variable.

    Variables (layers, optimizer slots, metric accumulators) are created from
    one batch of epoch 0, as `fit` does before its first step, so that state
    can be restored before any step runs.
    """
    with strategy.scope():
        model = job.build_model(job.config)
        if not isinstance(model, keras.Model):
            raise JobError(f"build_model returned {type(model).__name__}, not a keras.Model")
        if model.optimizer is None:
            raise JobError("build_model must return a compiled model: call model.compile(...) in it")
        if getattr(model, "steps_per_execution", 1) != 1:
            raise JobError(
                "compile(steps_per_execution>1) is not supported: callbacks and checkpoints run between single "
                "steps here; compile with steps_per_execution=1"
            )
        first = next(iter(train_source.epoch_dataset(0, job.seed, job.batch_size)))
        keras_compat.symbolic_build(model, first)
    return model


class _Run:
    def __init__(self, job: Job, store: CheckpointStore, strategy, resume: Checkpoint | None, verbose, echo,
                 preemption: PreemptionWatcher, group: Group):
        self.job = job
        self.group = group
        self.store = store
        self.strategy = strategy
        self.resume = resume
        self.verbose = verbose
        self.echo = echo
        self.uri = store.storage.uri
        self.attempt: int | None = None  # registered once every check has passed
        self.position = Position()
        self._last_logs = None  # the last train step's logs, as tensors
        self.copy_seconds: list[float] = []  # per save: the training thread's part of it
        self.writer = CheckpointWriter(store, max_in_flight=job.checkpoint.max_in_flight)
        self.writer.last_committed = resume.name if resume else None
        self.files = RunFiles(store.storage, private=not group.is_chief)  # another worker's files are not the run's
        self.sequence = 0  # the chief's commits: numbered once registered
        self.run_id = resume.state.get("run_id") if resume else uuid.uuid4().hex  # one id for all attempts
        self.preemption = preemption

    # -- set-up ------------------------------------------------------------

    def _build(self):
        job = self.job
        if job.deterministic:
            enable_determinism(job.seed)
        else:
            keras.utils.set_random_seed(job.seed)
        self.train_source = as_source(job.train_data, shuffle=True, what="train_data")
        self.val_source = as_source(job.validation_data, shuffle=False, what="validation_data")
        self.steps_per_epoch = self.train_source.num_batches(job.batch_size)
        self.validation_steps = self.val_source.num_batches(job.batch_size) if self.val_source is not None else None
        self.model = build_compiled_model(job, self.strategy, self.train_source)
        with self.strategy.scope():
            self.model.make_train_function()
            if self.val_source is not None:
                self.model.make_test_function()
        prepare_capture(self.model)
        if self.resume is not None:
            self.files.restore()
        self.run_context = RunContext(uri=self.uri, files_dir=self.files.local_dir)
        self.callbacks_built_at = time.time()  # event files this process opens from now on are this attempt's
        user_callbacks = job.make_callbacks(self.run_context)
        self.callbacks = keras.callbacks.CallbackList(
            user_callbacks,
            add_history=True,
            add_progbar=self.verbose != 0,
            verbose=self.verbose,
            epochs=job.epochs,
            steps=self.steps_per_epoch,
            model=self.model,
        )
        self.stateful_callbacks = callback_state.tracked(self.callbacks.callbacks)
        # What each user callback holds right after construction: only what changes after it is run state.
        self.callback_baseline = callback_state.baseline(self.stateful_callbacks)
        self.progbar = next((c for c in self.callbacks.callbacks if isinstance(c, keras.callbacks.ProgbarLogger)), None)

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        restore_model_state(self.model, checkpoint.tensors, state["variables"])
        self.position = Position(**state["position"])
        callback_state.restore(self.stateful_callbacks, state["callbacks"], checkpoint.tensors,
                               mid_epoch=self.position.batch > 0)
        restore_rng_state(state["rng"], checkpoint.tensors)
        self.model.stop_training = self.position.stop_training

    # -- checkpoints ---------------------------------------------------------

    def _commit(self, epoch_logs: dict | None = None, publish: bool = False, final_flush: bool = False) -> None:
        """Copy the state to host memory and queue its commit; the upload runs in the background.

        A `final_flush` (preemption: training stops here) takes the variables without a copy of
        their own and leaves pruning old checkpoints to the next attempt.

        Every worker calls it at the same step: the chief's capture gathers every
        worker's per-replica metric parts. The others store nothing, and neither does a
        superseded chief of several workers (the next agreement stops them all).
        """
        if not self.group.is_chief or (self.group.multi_worker and self.writer.superseded is not None):
            take_part_in_capture(self.model)
            return
        keras_compat.flush_async_callbacks(self.callbacks)  # their state is read below
        copy_started = time.perf_counter()
        self.position.stop_training = bool(self.model.stop_training)
        if self._last_logs is not None:
            self.position.train_logs = _pythonify(self._last_logs)
        tensors, variables = capture_model_state(self.model, copy=not final_flush)
        callbacks, callback_tensors = callback_state.capture(self.stateful_callbacks, self.callback_baseline)
        rng, rng_tensors = capture_rng_state()
        state = {
            "run_id": self.run_id,
            "position": dataclasses.asdict(self.position),
            "variables": variables,
            "callbacks": callbacks,
            "rng": rng,
            "replicas": self.strategy.num_replicas_in_sync,
            "replica_layout": self.group.describe(),
            "job": {
                "name": self.job.name,
                "source_path": self.job.source_path,
                "config": self.job.config,
                "epochs": self.job.epochs,
                "batch_size": self.job.batch_size,
                "seed": self.job.seed,
                "steps_per_epoch": self.steps_per_epoch,
                "checkpoint_every_steps": self.job.checkpoint.every_steps,
            },
            "host": socket.gethostname(),
            "history": self.recorder.state(),
        }
        published = self.recorder.deferred_tables() if publish or self.recorder.changed else None
        if self.writer.last_error is not None:
            self.files.forget_uploads()
        extra_files = self.files.snapshot()
        self.copy_seconds.append(time.perf_counter() - copy_started)
        self.sequence += 1
        self.writer.save(
            sequence=self.sequence,
            step=self.position.global_step,
            attempt=self.attempt,
            tensors={**tensors, **callback_tensors, **rng_tensors},
            state=state,
            metrics=_pythonify(epoch_logs) if epoch_logs else None,
            epoch_end=self.position.epoch if epoch_logs is not None else None,
            extra_files=extra_files,
            run_id=self.run_id,
            position={k: getattr(self.position, k) for k in ("epoch", "batch", "global_step")},
            published=published,
            prune=not final_flush,
        )

    # -- the loop --------------------------------------------------------------

    def run(self) -> RunResult:
        self._check_replicas()  # before anything is built: a refusal costs nothing
        self._build()
        if self.resume is not None:
            # Every check before the first write: a mismatch changes nothing stored.
            self._check_config(self.resume)
            check_model_fits(self.model, self.resume.state["variables"])
            callback_state.check_matches(self.stateful_callbacks, self.resume.state["callbacks"])
            position = Position(**self.resume.state["position"])
            if self._complete(position):
                # Before on_train_begin: a no-op rerun opens no files and starts no callbacks.
                self.echo(f"run at {self.uri} is already complete (epoch {position.epoch}, global step "
                          f"{position.global_step}); nothing to do (pass --epochs N to train further)")
                history = next((s for k, s in self.resume.state["callbacks"].items() if k.endswith("-History")), {})
                return RunResult(self.uri, "already_complete", self.resume.attempt, position,
                                 history.get("history", {}), self.resume.name)
        # Registered before anything is written: from now on an older process of this run cannot commit.
        self.attempt = int(self.group.from_chief(self._register_attempt, 1)[0])
        self.recorder = HistoryRecorder(self.attempt, every_steps=self.job.history_every_steps)
        if self.resume is not None:
            callback_state.prepare_resume(self.stateful_callbacks, self.resume.state["callbacks"], self.callbacks_built_at)
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        if self.resume is not None:
            self._restore(self.resume)
            self.recorder.restore(self.resume.state["history"], mid_epoch=self.position.batch > 0)
            p = self.position
            self.echo(
                f"resuming run {self.job.name!r} at {self.uri} from {self.resume.name}: "
                f"epoch {p.epoch + 1}, batch {p.batch} (global step {p.global_step}), attempt {self.attempt}"
            )
            stored = self.resume.state.get("replicas")
            if stored is not None and stored != self.strategy.num_replicas_in_sync:
                before = self.resume.state.get("replica_layout", f"{stored} replicas")
                self.echo(
                    f"the replica count changed from {stored} ({before}) to {self.strategy.num_replicas_in_sync} "
                    f"({self.group.describe()}): training continues at the next batch with the same global batch of "
                    f"{self.job.batch_size}, each metric's total split evenly over the new replicas; bitwise equality "
                    "with an uninterrupted run is promised only on the same replica count"
                )
        else:
            self.echo(f"starting run {self.job.name!r} at {self.uri} (attempt {self.attempt}, "
                      f"{self.strategy.num_replicas_in_sync} replica(s)"
                      + (f": {self.group.describe()})" if self.group.multi_worker else ")"))
        self.position.finished = False

        training_logs = None
        for epoch in range(self.position.epoch, self.job.epochs):
            if self.model.stop_training and self.position.batch == 0:
                break  # stopped at the end of the previous epoch, as fit would have
            resumed_mid_epoch = self.position.batch > 0
            if resumed_mid_epoch:
                if self.progbar is not None:
                    self.progbar.on_epoch_begin(epoch)
            else:
                self.model.reset_metrics()
                self.recorder.begin_epoch(epoch)
                self.callbacks.on_epoch_begin(epoch)
            logs = self._train_epoch(epoch)
            epoch_logs = dict(keras_compat.metrics_result_or_logs(self.model, logs or {}))
            if self.val_source is not None:
                epoch_logs.update({f"val_{k}": v for k, v in self._evaluate().items()})
            self.callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            self.recorder.end_epoch(epoch, self.position.global_step, _pythonify(epoch_logs), self._learning_rate())
            self.position = dataclasses.replace(self.position, epoch=epoch + 1, batch=0, train_logs=None)
            self._last_logs = None
            agreement = self._agreement()
            if agreement.stop:
                self._flush_and_stop(agreement, epoch_logs)
            if self.job.checkpoint.every_epoch or agreement.commit:
                self._commit(epoch_logs)
            if self.model.stop_training:
                break

        self.model.optimizer.finalize_variable_values(self.model.trainable_weights)
        self.callbacks.on_train_end(logs=training_logs)
        self.position.finished = True
        self._commit(publish=True)
        self._wait_for_commits()
        if self.writer.stall_seconds > 0.5:
            self.echo(f"training waited {self.writer.stall_seconds:.1f}s in total for checkpoint uploads")
        return self._result("completed")

    def _train_epoch(self, epoch: int):
        """Train from `position.batch` to the end of `epoch`; returns the last step's logs."""
        job = self.job
        start = self.position.batch
        logs = self.position.train_logs
        if self.model.stop_training and start > 0:
            return logs  # the run was stopped right after batch `start - 1`; fit would not train on
        dataset = self.train_source.epoch_dataset(epoch, job.seed, job.batch_size, start_batch=start)
        steps = self.steps_per_epoch - start if self.steps_per_epoch is not None else None
        iterator = iter(self._distribute(dataset, steps))
        batch = start
        while self.steps_per_epoch is None or batch < self.steps_per_epoch:
            self.callbacks.on_train_batch_begin(batch)
            self.group.cast(self._vote())  # on several workers, the step carries every worker's vote
            logs = _run_step(self.model.train_function, iterator)
            if logs is None:
                break  # an epoch of unknown length ended (fit's first epoch, too, begins this batch first)
            votes = self.group.take_votes(logs)  # before the callbacks see the logs
            self.callbacks.on_train_batch_end(batch, logs)
            batch += 1
            self._last_logs = logs
            self.position = dataclasses.replace(self.position, batch=batch, global_step=self.position.global_step + 1)
            if self.recorder.step_due(self.position.global_step):
                self.recorder.add_step(epoch, batch - 1, self.position.global_step, _pythonify(logs), self._learning_rate())
            agreement = self._agreement(votes)
            if agreement.stop:
                self._flush_and_stop(agreement)
            if job.checkpoint.due_at_step(self.position.global_step) or agreement.commit:
                self._commit()
            if self.model.stop_training:
                break
        return logs

    def _evaluate(self) -> dict:
        """Validation as `Model.evaluate` runs it inside `fit`, through the same callbacks."""
        job = self.job
        self.model.stop_evaluating = False
        self.callbacks.on_test_begin()
        logs = {}
        self.model.reset_metrics()
        dataset = self.val_source.epoch_dataset(0, job.seed, job.batch_size)
        iterator = iter(self._distribute(dataset, self.validation_steps))
        batch = 0
        while self.validation_steps is None or batch < self.validation_steps:
            self.callbacks.on_test_batch_begin(batch)
            step_logs = _run_step(self.model.test_function, iterator)
            if step_logs is None:
                break
            self.group.take_votes(step_logs)  # the votes count after training steps only
            logs = step_logs
            self.callbacks.on_test_batch_end(batch, logs)
            batch += 1
            if self.model.stop_evaluating:
                break
        logs = _pythonify(keras_compat.metrics_result_or_logs(self.model, logs))
        self.callbacks.on_test_end(logs)
        return logs

    def _flush_and_stop(self, agreement: Agreement, epoch_logs: dict | None = None) -> None:
        """On a preemption notice: commit at this batch boundary, wait for the upload, stop.

        Called between steps, so the resumed run re-runs no step. A notice that
        arrives during validation is acted on at the end of the epoch. On several
        workers a notice on any one stops them all after the same step: the chief
        commits, and every worker raises `PreemptedError` once it has.
        """
        notice = self._group_notice(agreement)
        p = self.position
        step_wait = time.monotonic() - notice.received_at
        self.echo(f"preemption notice ({notice.source}): committing at epoch {p.epoch + 1}, batch {p.batch} "
                  f"(global step {p.global_step}); {notice.seconds_left():.1f}s to the deadline")
        self._commit(epoch_logs, publish=True, final_flush=True)
        self._wait_for_commits()
        took = time.monotonic() - notice.received_at
        report = self.store.last_commit
        if report is not None and report.name == self.writer.last_committed:
            self.echo(f"flush of {report.nbytes / 1e6:.1f} MB: finishing the step {step_wait:.3f}s, "
                      f"host copy {self.copy_seconds[-1]:.3f}s, {report.stages()}")
        left = notice.seconds_left()
        if left < 0:
            self.echo(f"warning: the flush took {took:.1f}s, {-left:.1f}s past the deadline; "
                      "raise the grace period or save more often")
        raise PreemptedError(
            f"preempted ({notice.source}): state committed as {self.writer.last_committed} at global step "
            f"{p.global_step}, {took:.2f}s after the notice ({max(left, 0):.1f}s before the deadline). "
            "Run the same command again to resume"
        )

    def _group_notice(self, agreement: Agreement) -> Notice:
        """The notice that stops the run, as this worker knows it: its own, else another worker's
        (its deadline is the least time left among the workers that have one)."""
        own = self.preemption.notice
        if not self.group.multi_worker:
            return own
        if own is not None:
            return dataclasses.replace(own, source=f"{own.source} on worker {self.group.index}")
        now = time.monotonic()
        return Notice(f"a notice on worker {agreement.noticed_by[0]}", now, now + agreement.seconds_left)

    # -- agreement between workers --------------------------------------------------

    def _vote(self) -> Vote:
        notice = self.preemption.notice
        return Vote(notice_seconds_left=notice.seconds_left() if notice is not None else None,
                    superseded=self.writer.superseded is not None, commit=self._commit_requested())

    def _agreement(self, votes=None) -> Agreement:
        """What every worker does now: after a step (on several workers, with the `votes` that step
        carried), or at the end of an epoch."""
        agreement = self.group.agreement_from(votes) if votes is not None else self.group.agree(self._vote())
        if agreement.superseded:
            raise self.writer.superseded or SupersededError(
                "the chief (worker 0) was superseded by a later attempt of the run; this group stopped without writing")
        return agreement

    def _commit_requested(self) -> bool:
        """A commit this worker asks for now, besides the deterministic `every_steps` and epoch ends.

        None today. A decision that depends on this worker's own measurements (a cadence the
        chief times, a soft notice on one node) goes here: asked before every step and at every
        epoch end, it travels with that step's votes, and every worker commits after that step
        (with one worker: after the step that just ended).
        """
        return False

    def _wait_for_commits(self) -> None:
        """The chief waits for its commits to finish; every worker learns the last one's name, or
        raises the chief's error (a final save that failed, a superseded attempt)."""

        def wait() -> tuple[int, int, int]:
            name = self.writer.wait()
            return parse_name(name) if name else (0, 0, 0)

        sequence, step, attempt = (int(v) for v in self.group.from_chief(wait, 3))
        if not self.group.is_chief and sequence:
            self.writer.last_committed = checkpoint_name(sequence, step, attempt)

    def _register_attempt(self) -> tuple[int]:
        """(The chief) Register this attempt of the run; its commits are numbered past anything written."""
        attempt = register_attempt(self.store.storage, resumed_from_sequence=self.resume.sequence if self.resume else 0)
        self.sequence = self.store.highest_sequence()
        return (attempt,)

    def _complete(self, position: Position) -> bool:
        return position.finished and (position.stop_training or position.epoch >= self.job.epochs)

    def _check_replicas(self) -> None:
        """Refuse a replica count that does not divide the global batch where it would change what a batch means."""
        replicas, batch_size = self.strategy.num_replicas_in_sync, self.job.batch_size
        if self.resume is not None and self._complete(Position(**self.resume.state["position"])):
            return  # nothing will be trained
        stored = self.resume.state.get("replicas") if self.resume is not None else None
        if batch_size % replicas and (self.group.multi_worker or (stored is not None and stored != replicas)):
            divisors = ", ".join(str(d) for d in range(1, min(batch_size, 64) + 1) if batch_size % d == 0)
            raise ConfigError(
                f"the global batch size {batch_size} does not split evenly over {replicas} replicas "
                f"({self.group.describe()}), as a run on several workers or resumed on another replica count needs "
                f"(every replica's loss weighs the same in a step): use workers x devices among {divisors}"
            )

    def _distribute(self, dataset: tf.data.Dataset, steps: int | None):
        """The strategy's input from a dataset of global batches (`steps` of them, if known).

        On several workers each worker feeds its replicas their part of every global batch
        (`replica_batches`); with the number of steps known, the input never runs dry, so
        the step does not ask every worker whether it still has data.
        """
        if not self.group.multi_worker:
            return self.strategy.experimental_distribute_dataset(dataset)
        parts = replica_batches(dataset, self.strategy.num_replicas_in_sync, self.group.local_replica_ids)
        if steps is not None:
            parts = parts.repeat()
        return self.strategy.distribute_datasets_from_function(lambda context: parts)

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _check_config(self, checkpoint: Checkpoint) -> None:
        stored = checkpoint.state["job"]
        if stored["batch_size"] != self.job.batch_size or stored["seed"] != self.job.seed:
            raise CheckpointError(
                f"the run at {self.uri} was started with batch_size={stored['batch_size']}, seed={stored['seed']}; "
                f"the job now has batch_size={self.job.batch_size}, seed={self.job.seed}. "
                "Resuming would feed different batches: restore them, or use another --storage URI"
            )
        if stored["config"] != self.job.config:
            changed = sorted(k for k in set(stored["config"]) | set(self.job.config) if stored["config"].get(k) != self.job.config.get(k))
            self.echo(f"warning: config differs from the run's checkpoint in {changed}; continuing with the new values")

    def _result(self, status: str) -> RunResult:
        history = next((c for c in self.callbacks.callbacks if isinstance(c, keras.callbacks.History)), None)
        return RunResult(
            uri=self.uri,
            status=status,
            attempt=self.attempt,
            position=self.position,
            history=dict(history.history) if history else {},
            checkpoint=self.writer.last_committed,
            checkpoint_stats={"saves": len(self.copy_seconds), "host_copy_seconds": sum(self.copy_seconds),
                              "host_copy_median_seconds": statistics.median(self.copy_seconds or [0.0]),
                              "stall_seconds": self.writer.stall_seconds},
        )


_NOTHING_AGREED = Agreement()


def _run_step(function: Callable, iterator) -> dict | None:
    """One compiled step on the iterator's next batch; None when the iterator is exhausted.

    Given the iterator itself, Keras's function pulls the batch inside its graph, as `fit`
    does; fetching the distributed batch eagerly and passing it in costs more Python per step.
    """
    try:
        return function(iterator)
    except (StopIteration, tf.errors.OutOfRangeError):
        return None


def _pythonify(logs: Any) -> dict | None:
    if logs is None:
        return None
    return keras_compat.pythonify_logs(logs)
