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

from cluster_trainer import callback_state, keras_compat, run_state
from cluster_trainer.cadence import Cadence
from cluster_trainer.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter, register_attempt
from cluster_trainer.data import as_source
from cluster_trainer.deadlines import late_notice_warning, notice_windows
from cluster_trainer.devices import enable_determinism, make_strategy
from cluster_trainer.errors import CheckpointError, ClusterTrainerError, JobError, StateMismatchError
from cluster_trainer.history import HistoryRecorder
from cluster_trainer.job import Job, RunContext
from cluster_trainer.preemption import (
    NoticeSource,
    PreemptedError,
    PreemptionWatcher,
    sources_from_environment,
    started_too_late,
)
from cluster_trainer.state import (
    capture_model_state,
    capture_rng_state,
    check_model_fits,
    prepare_capture,
    restore_model_state,
    restore_rng_state,
)
from cluster_trainer.run_files import RunFiles
from cluster_trainer.storage import Storage, disk_error

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
    # Where this epoch began in the data: pass `data_pass` (None: the epoch's own number), batch
    # `data_offset` of it. With steps_per_epoch, fit's epochs are windows of a pass (see `_Run._next_start`).
    data_pass: int | None = None
    data_offset: int = 0


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
) -> RunResult:
    """Run `job` to the end, storing checkpoints under `storage`; resume if it holds one.

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

    Example:
        >>> result = train(load_job("jobs/mlp.py"), "runs/mlp")   # doctest: +SKIP
        >>> result.history["val_loss"][-1]                          # doctest: +SKIP
    """
    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    keras_compat.check_versions()
    if epochs is not None:
        job = dataclasses.replace(job, epochs=epochs)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    run_storage = Storage(storage, {**job.storage_options, **(storage_options or {})})
    run_storage.check()
    policy = job.checkpoint
    store = CheckpointStore(run_storage, policy.retention(), shard_bytes=policy.shard_mb * 2**20,
                            check_state=run_state.check)
    strategy = strategy or make_strategy(devices)
    resume = store.load_latest()
    if notice_sources is None:
        notice_sources = sources_from_environment()
    run = _Run(job, store, strategy, resume, verbose, echo, PreemptionWatcher(notice_sources))
    run.preemption.start(handle_signals=handle_signals)
    try:
        return run.run()
    except Exception as e:  # a full or read-only disk, wherever it was written (a callback's file, a checkpoint)
        translated = None if isinstance(e, ClusterTrainerError) else disk_error(e)
        if translated is None:
            raise
        raise translated from e
    finally:
        run.preemption.stop()
        run.writer.close()
        run.files.close()  # the scratch copy of files/ on object stores: mirrored with every commit
        for source in (getattr(run, "train_source", None), getattr(run, "val_source", None)):
            if source is not None:
                source.stop()  # a PyDataset's workers, when the run ended mid-pass


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
        keras_compat.distribute_gradient_accumulation(model.optimizer)  # before the step is traced
        first = next(iter(train_source.epoch_dataset(0, job.seed, job.batch_size)))
        train_source.stop()
        keras_compat.symbolic_build(model, first)
    return model


class _Run:
    def __init__(self, job: Job, store: CheckpointStore, strategy, resume: Checkpoint | None, verbose, echo,
                 preemption: PreemptionWatcher):
        self.job = job
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
        # When to commit, from what saves, commits and steps take here; and whether a flush fits the notice windows.
        self.cadence = Cadence(job.checkpoint, windows=notice_windows(preemption.grace_seconds, preemption.sources),
                               echo=echo)
        preemption.flush_estimate = self.cadence.flush_seconds
        self.writer = CheckpointWriter(store, max_in_flight=job.checkpoint.max_in_flight,
                                       on_committed=self.cadence.committed)
        self.writer.last_committed = resume.name if resume else None
        self.files = RunFiles(store.storage)
        # One id for all attempts: the resumed checkpoint's, or the one the run's first attempt recorded.
        self.run_id = (resume.state.get("run_id") if resume else None) or store.run_id() or uuid.uuid4().hex
        self.preemption = preemption

    # -- set-up ------------------------------------------------------------

    def _build(self):
        job = self.job
        if job.deterministic:
            enable_determinism(job.seed)
        else:
            keras.utils.set_random_seed(job.seed)
        self.train_source = as_source(job.train_data, shuffle=job.shuffle, what="train_data", class_weight=job.class_weight)
        self.val_source = as_source(job.validation_data, shuffle=False, what="validation_data")
        self.train_batches = self.train_source.num_batches(job.batch_size)  # in one pass; None: unknown or infinite
        if self.train_source.infinite and job.steps_per_epoch is None:
            raise JobError("Job.train_data is infinite (it repeats): set Job.steps_per_epoch to say where an epoch "
                           "ends, as fit needs")
        self.steps_per_epoch = job.steps_per_epoch or self.train_batches
        self.validation_batch_size = job.validation_batch_size or job.batch_size
        self.validation_steps = None
        if self.val_source is not None:
            known = [n for n in (self.val_source.num_batches(self.validation_batch_size), job.validation_steps) if n]
            if self.val_source.infinite and job.validation_steps is None:
                raise JobError("Job.validation_data is infinite (it repeats): set Job.validation_steps, as fit needs")
            self.validation_steps = min(known) if known else None
        self.model = build_compiled_model(job, self.strategy, self.train_source)
        with self.strategy.scope():
            self.model.make_train_function()
            if self.val_source is not None:
                self.model.make_test_function()
        prepare_capture(self.model)
        self.files.check()  # before any callback opens a file there
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
        fell_back = restore_model_state(self.model, checkpoint.tensors, state["variables"])
        if fell_back:
            self.echo(f"warning: the checkpoint was written on {state.get('replicas')} replicas and this run has "
                      f"{self.strategy.num_replicas_in_sync}; each replica's own value of {len(fell_back)} variable(s) "
                      f"({', '.join(fell_back[:3])}{', ...' if len(fell_back) > 3 else ''}) was replaced by the metric's "
                      "total or the first replica's copy: the run goes on, but is not bitwise equal to one that "
                      "kept its replica count")
        self.position = Position(**state["position"])
        callback_state.restore(self.stateful_callbacks, state["callbacks"], checkpoint.tensors,
                               mid_epoch=self.position.batch > 0)
        restore_rng_state(state["rng"], checkpoint.tensors)
        self.model.stop_training = self.position.stop_training

    # -- checkpoints ---------------------------------------------------------

    def _commit(self, epoch_logs: dict | None = None, publish: bool = False, final_flush: bool = False,
                early: bool = False) -> None:
        """Copy the state to host memory and queue its commit; the upload runs in the background.

        A `final_flush` (preemption: training stops here) takes the variables without a copy of
        their own and leaves pruning old checkpoints to the next attempt. `early`: a save on an
        early warning.
        """
        save_started = time.perf_counter()  # what the save costs the training thread, for the cadence
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
            "job": {
                "name": self.job.name,
                "source_path": self.job.source_path,
                "config": self.job.config,
                "epochs": self.job.epochs,
                "batch_size": self.job.batch_size,
                "seed": self.job.seed,
                "steps_per_epoch": self.steps_per_epoch,
                "checkpoint_every_steps": self.job.checkpoint.every_steps,
                "fit_arguments": _fit_arguments(self.job),
            },
            "host": socket.gethostname(),
            "history": self.recorder.state(),
            "cadence": self.cadence.state(flush=final_flush),
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
        self.cadence.saved(self.position.global_step, time.perf_counter() - save_started,
                           overhead=not (final_flush or self.position.finished), early=early)

    # -- the loop --------------------------------------------------------------

    def run(self) -> RunResult:
        self._build()
        if self.resume is not None:
            # Every check before the first write: a mismatch changes nothing stored.
            self._check_config(self.resume)
            position = Position(**self.resume.state["position"])
            if position.finished and (position.stop_training or position.epoch >= self.job.epochs):
                # Before on_train_begin: a no-op rerun opens no files and starts no callbacks.
                self.echo(f"run at {self.uri} is already complete (epoch {position.epoch}, global step "
                          f"{position.global_step}); nothing to do (pass --epochs N to train further)")
                history = next((s for k, s in self.resume.state["callbacks"].items() if k.endswith("-History")), {})
                return RunResult(self.uri, "already_complete", self.resume.attempt, position,
                                 history.get("history", {}), self.resume.name)
        if self.preemption.notice is not None:  # it came during start-up: nothing to commit yet
            raise started_too_late(self.preemption.notice.source)
        # Registered before anything is written: from now on an older process of this run cannot commit.
        self.attempt = register_attempt(self.store.storage, resumed_from_sequence=self.resume.sequence if self.resume else 0,
                                        run_id=self.run_id)
        self.sequence = self.store.highest_sequence()  # past anything written, committed or not
        self.recorder = HistoryRecorder(self.attempt, every_steps=self.job.history_every_steps)
        if self.resume is not None:
            callback_state.prepare_resume(self.stateful_callbacks, self.resume.state["callbacks"], self.callbacks_built_at)
        self.model.stop_training = False
        # fit reads the first batch (to build the model) and resets its data before on_train_begin.
        self.train_source.on_epoch_begin()
        self.train_source.on_epoch_end()
        if self.resume is not None:
            self._replay_data_hooks(self.resume.state["position"]["epoch"])
        self.callbacks.on_train_begin()
        if self.resume is not None:
            self._restore(self.resume)
            self.recorder.restore(self.resume.state["history"], mid_epoch=self.position.batch > 0)
            p = self.position
            self.echo(
                f"resuming run {self.job.name!r} at {self.uri} from {self.resume.name}: "
                f"epoch {p.epoch + 1}, batch {p.batch} (global step {p.global_step}), attempt {self.attempt}"
            )
        else:
            self.echo(f"starting run {self.job.name!r} at {self.uri} (attempt {self.attempt}, "
                      f"{self.strategy.num_replicas_in_sync} replica(s))")
        for source in (self.train_source, self.val_source):
            if source is not None and source.describe():
                self.echo(source.describe())
        self.cadence.begin(self.attempt, self.position.global_step,
                           stored=self.resume.state.get("cadence") if self.resume else None,
                           resumed_attempt=self.resume.attempt if self.resume else None,
                           resumed_finished=self.position.finished)
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
            self.train_source.on_epoch_begin()  # a new object in a resumed process: called there too
            logs, ran_out = self._train_epoch(epoch)
            if not self.model.stop_training:
                self.train_source.on_epoch_end()  # fit's data ends its epoch unless a callback stopped training
            data_pass, offset = self._next_start(epoch, ran_out)
            epoch_logs = dict(keras_compat.metrics_result_or_logs(self.model, logs or {}))
            if self.val_source is not None and self.job.validates_after(epoch):
                epoch_logs.update({f"val_{k}": v for k, v in self._evaluate().items()})
            self.callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            self.recorder.end_epoch(epoch, self.position.global_step, _pythonify(epoch_logs), self._learning_rate())
            self.position = dataclasses.replace(self.position, epoch=epoch + 1, batch=0, train_logs=None,
                                                data_pass=data_pass, data_offset=offset)
            self._last_logs = None
            if self.preemption.notice is not None:
                self._flush_and_stop(epoch_logs)
            if self.job.checkpoint.every_epoch:
                self._commit(epoch_logs)
            if self.model.stop_training:
                break

        self.model.optimizer.finalize_variable_values(self.model.trainable_weights)
        self.callbacks.on_train_end(logs=training_logs)
        self.position.finished = True
        self._commit(publish=True)
        self.writer.wait()
        if self.writer.stall_seconds > 0.5:
            self.echo(f"training waited {self.writer.stall_seconds:.1f}s in total for checkpoint uploads")
        return self._result("completed")

    def _train_epoch(self, epoch: int) -> tuple[dict | None, bool]:
        """Train from `position.batch` to the end of `epoch`.

        Returns the last step's logs and whether the data ran out (its pass ended before the epoch's steps).
        """
        job = self.job
        start = self.position.batch
        logs = self.position.train_logs
        if self.model.stop_training and start > 0:
            return logs, False  # the run was stopped right after batch `start - 1`; fit would not train on
        data_pass, offset = self._epoch_start(epoch)
        steps = self._steps_in_epoch(offset)
        dataset = self.train_source.epoch_dataset(data_pass, job.seed, job.batch_size, start_batch=offset + start)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        batch = start
        while steps is None or batch < steps:
            step_started, uploading = time.perf_counter(), self.writer.in_flight() > 0
            self.callbacks.on_train_batch_begin(batch)
            step_logs = _run_step(self.model.train_function, iterator)
            if step_logs is None:
                # The data ended (fit's first epoch, too, begins this batch first). The epoch's logs stay the
                # last step's, as in fit.
                self.train_source.stop()
                return logs, True
            logs = step_logs
            self.callbacks.on_train_batch_end(batch, logs)
            self.cadence.step_done(time.perf_counter() - step_started, busy=uploading)
            batch += 1
            self._last_logs = logs
            self.position = dataclasses.replace(self.position, batch=batch, global_step=self.position.global_step + 1)
            if self.recorder.step_due(self.position.global_step):
                self.recorder.add_step(epoch, batch - 1, self.position.global_step, _pythonify(logs), self._learning_rate())
            if self.preemption.notice is not None:
                self._flush_and_stop()
            warnings = self.preemption.take_warnings()
            if warnings:
                self._save_early(warnings)
            # Steps to the epoch-end commit: an "auto" save that would still be uploading then is left to it.
            epoch_commit_in = steps - batch if job.checkpoint.every_epoch and steps else None
            if self.cadence.due(self.position.global_step, self.writer.in_flight(), epoch_commit_in):
                self._commit()
            if self.model.stop_training:
                break
        self.train_source.stop()
        return logs, False

    def _epoch_start(self, epoch: int) -> tuple[int, int]:
        """The pass and the batch of it where `epoch` began."""
        p = self.position
        return (epoch if p.data_pass is None else p.data_pass), p.data_offset

    def _steps_in_epoch(self, offset: int) -> int | None:
        """Steps in an epoch that begins at batch `offset` of its pass; None: until the data ends.

        As fit counts them: `steps_per_epoch`, but no more than the pass has left.
        """
        if self.job.steps_per_epoch is None:
            return self.train_batches
        if self.train_batches is None:
            return self.job.steps_per_epoch
        return min(self.job.steps_per_epoch, self.train_batches - offset)

    def _next_start(self, epoch: int, ran_out: bool) -> tuple[int, int]:
        """Where the epoch after `epoch` begins: where this one stopped, or a new pass if this one finished
        its pass. This is fit's iterator carried over between epochs (with steps_per_epoch), and a new one
        once the data is used up; an infinite dataset's epochs are consecutive windows of its one pass."""
        data_pass, offset = self._epoch_start(epoch)
        end = offset + self.position.batch
        if ran_out or (self.train_batches is not None and end >= self.train_batches):
            return data_pass + 1, 0
        return data_pass, end

    def _replay_data_hooks(self, epochs_done: int) -> None:
        """Call the PyDataset hooks of the epochs already trained, as fit called them, on the new objects.

        A PyDataset that reorders itself in `on_epoch_end` from a generator it seeds itself is then where it
        was when the checkpoint was written (the hooks are no-ops for other data).
        """
        for epoch in range(epochs_done):
            self.train_source.on_epoch_begin()
            self.train_source.on_epoch_end()
            if self.val_source is not None and self.job.validates_after(epoch):
                for _ in range(2):  # evaluate's setup read, then its pass
                    self.val_source.on_epoch_begin()
                    self.val_source.on_epoch_end()

    def _evaluate(self) -> dict:
        """Validation as `Model.evaluate` runs it inside `fit`, through the same callbacks."""
        self.model.stop_evaluating = False
        # evaluate reads a first batch (to build the model) and resets its data, before on_test_begin
        self.val_source.on_epoch_begin()
        self.val_source.on_epoch_end()
        self.callbacks.on_test_begin()
        logs = {}
        self.model.reset_metrics()
        dataset = self.val_source.epoch_dataset(0, self.job.seed, self.validation_batch_size)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        self.val_source.on_epoch_begin()
        batch = 0
        while self.validation_steps is None or batch < self.validation_steps:
            self.callbacks.on_test_batch_begin(batch)
            step_logs = _run_step(self.model.test_function, iterator)
            if step_logs is None:
                break
            logs = step_logs
            self.callbacks.on_test_batch_end(batch, logs)
            batch += 1
            if self.model.stop_evaluating:
                break
        self.val_source.stop()
        if not self.model.stop_evaluating:
            self.val_source.on_epoch_end()
        logs = _pythonify(keras_compat.metrics_result_or_logs(self.model, logs))
        self.callbacks.on_test_end(logs)
        return logs

    def _flush_and_stop(self, epoch_logs: dict | None = None) -> None:
        """On a preemption notice: commit at this batch boundary, wait for the upload, stop.

        Called between steps, so the resumed run re-runs no step. A notice that
        arrives during validation is acted on at the end of the epoch.
        """
        notice = self.preemption.notice
        p = self.position
        step_wait = time.monotonic() - notice.received_at
        self.echo(f"preemption notice ({notice.source}): committing at epoch {p.epoch + 1}, batch {p.batch} "
                  f"(global step {p.global_step}); {notice.seconds_left():.1f}s to the deadline")
        late = late_notice_warning(notice.seconds_left(), self.cadence.flush_seconds(), self.writer.last_committed)
        if late:
            self.echo(late)
        self._commit(epoch_logs, publish=True, final_flush=True)
        self.writer.wait()
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

    def _save_early(self, warnings) -> None:
        """On early warnings (not yet notices): commit here, once for all of them, and train on.

        If the notice never comes nothing was lost; if it comes, or the machine
        goes without one, the work since this commit is all there is to redo.
        """
        p = self.position
        said = "; ".join(f"{w.source}: {w.reason}" for w in warnings)
        self.echo(f"early warning ({said}): saving at epoch {p.epoch + 1}, batch {p.batch} "
                  f"(global step {p.global_step}) and training on")
        self._commit(early=True)

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _check_config(self, checkpoint: Checkpoint) -> None:
        """Refuse what cannot resume (batches, model, callbacks); then warn of a changed config, which may be
        deliberate. A refusal names a config change that explains it, and no warning comes before it."""
        stored = checkpoint.state["job"]
        stored_fit = stored.get("fit_arguments") or _fit_arguments(None)  # older checkpoints: fit's defaults
        current_fit = _fit_arguments(self.job)
        # What decides which batch comes next; a change would feed different batches.
        order = ("batch_size", "seed", "steps_per_epoch", "shuffle")
        was = {**{k: stored[k] for k in ("batch_size", "seed")}, **stored_fit}
        now = {**{k: getattr(self.job, k) for k in ("batch_size", "seed")}, **current_fit}
        changed = [k for k in order if was[k] != now[k]]
        if changed:
            raise CheckpointError(
                f"the run at {self.uri} was started with {', '.join(f'{k}={was[k]!r}' for k in changed)}; "
                f"the job now has {', '.join(f'{k}={now[k]!r}' for k in changed)}. "
                "Resuming would feed different batches: restore them, or use another --storage URI"
            )
        changed = sorted(k for k in set(stored["config"]) | set(self.job.config) if stored["config"].get(k) != self.job.config.get(k))
        try:
            check_model_fits(self.model, checkpoint.state["variables"])
            callback_state.check_matches(self.stateful_callbacks, checkpoint.state["callbacks"])
        except StateMismatchError as e:
            if not changed:
                raise
            was = ", ".join(f"{k}={stored['config'].get(k)!r} (now {self.job.config.get(k)!r})" for k in changed)
            raise StateMismatchError(f"config differs from the run's checkpoint in {was}, and {e}") from None
        changed_fit = sorted(k for k in current_fit if k not in order and stored_fit[k] != current_fit[k])
        if changed_fit:
            self.echo(f"warning: {', '.join(changed_fit)} differ(s) from the run's checkpoint; continuing with the new values")
        if changed:
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
                              "host_copy_median_seconds": statistics.median(self.copy_seconds),
                              "stall_seconds": self.writer.stall_seconds,
                              "overhead": self.cadence.overhead(), "interval": self.cadence.interval.steps,
                              "step_seconds": self.cadence.measurements().step_seconds,
                              "early_saves": self.cadence.early_saves},
        )


def _run_step(function: Callable, iterator) -> dict | None:
    """One compiled step on the iterator's next batch; None when the iterator is exhausted.

    Given the iterator itself, Keras's function pulls the batch inside its graph, as `fit`
    does; fetching the distributed batch eagerly and passing it in costs more Python per step.
    """
    try:
        return function(iterator)
    except (StopIteration, tf.errors.OutOfRangeError):
        return None


def _fit_arguments(job: Job | None) -> dict:
    """The job's `fit` arguments (their defaults for None) as JSON keeps them (class weights as [class, weight] pairs)."""
    values = {name: getattr(job, name) if job else Job.__dataclass_fields__[name].default
              for name in run_state.FIT_ARGUMENTS}
    if values["class_weight"]:
        values["class_weight"] = sorted([k, v] for k, v in values["class_weight"].items())
    if isinstance(values["validation_freq"], tuple):
        values["validation_freq"] = list(values["validation_freq"])
    return values


def _pythonify(logs: Any) -> dict | None:
    if logs is None:
        return None
    return keras_compat.pythonify_logs(logs)
