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

from cluster_trainer import callback_state, keras_compat, run_state
from cluster_trainer.agreement import PEER_LOST_ERRORS, Agreement, Group, Vote, WorkerLostError, peer_lost_reason
from cluster_trainer.cadence import Cadence
from cluster_trainer.checkpoint import (
    Checkpoint, CheckpointStore, CheckpointWriter, SupersededError, checkpoint_name, register_attempt,
)
from cluster_trainer.checkpoint.format import parse_name
from cluster_trainer.data import as_source, replica_batches
from cluster_trainer.deadlines import late_notice_warning, notice_windows
from cluster_trainer.devices import enable_determinism, make_strategy, on_several_workers
from cluster_trainer.errors import CheckpointError, ClusterTrainerError, ConfigError, JobError, StateMismatchError
from cluster_trainer.history import HistoryRecorder
from cluster_trainer.job import Job, RunContext
from cluster_trainer.preemption import (
    Notice,
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
    take_part_in_capture,
)
from cluster_trainer.run_files import RunFiles
from cluster_trainer.storage import Storage, disk_error
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
    store = CheckpointStore(run_storage, policy.retention(), shard_bytes=policy.shard_mb * 2**20,
                            check_state=run_state.check)
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
        with keras_compat.untuned_device_pipelines():  # no autotuner to wait for at each epoch's end
            return run.run()
    except PEER_LOST_ERRORS as e:
        if not group.multi_worker:
            raise
        raise WorkerLostError(
            f"worker {group.index} lost the rest of its group ({type(e).__name__}: {peer_lost_reason(e)}); "
            "start every worker again: the run resumes from its last commit"
        ) from e
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
        keras_compat.distribute_gradient_accumulation(model.optimizer)  # before the step is traced
        first = next(iter(train_source.epoch_dataset(0, job.seed, job.batch_size)))
        train_source.stop()
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
        # When to commit, from what saves, commits and steps take here; and whether a flush fits the notice windows.
        self.cadence = Cadence(job.checkpoint, windows=notice_windows(preemption.grace_seconds, preemption.sources),
                               echo=echo)
        preemption.flush_estimate = self.cadence.flush_seconds
        self.writer = CheckpointWriter(store, max_in_flight=job.checkpoint.max_in_flight,
                                       on_committed=self.cadence.committed)
        self.writer.last_committed = resume.name if resume else None
        self.files = RunFiles(store.storage, private=not group.is_chief)  # another worker's files are not the run's
        self.sequence = 0  # the chief's commits: numbered once registered
        # One id for all attempts: the resumed checkpoint's, or the one the run's first attempt recorded.
        self.run_id = (resume.state.get("run_id") if resume else None) or store.run_id() or uuid.uuid4().hex
        self._wants_commit = False  # on several workers: this worker's commit request, carried by the next step
        self._early_warnings: list = []  # on several workers: early warnings waiting for the commit they asked for
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
        self.group.read_votes_after(self.model)  # before the step is traced
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

        Every worker calls it at the same step: the chief's capture gathers every
        worker's per-replica metric parts and layer state. The others store nothing, and
        neither does a superseded chief of several workers (the next agreement stops them all).
        """
        if not self.group.is_chief or (self.group.multi_worker and self.writer.superseded is not None):
            take_part_in_capture(self.model)
            return
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
        self._check_replicas()  # before anything is built: a refusal costs nothing
        self._build()
        if self.resume is not None:
            # Every check before the first write: a mismatch changes nothing stored.
            self._check_config(self.resume)
            position = Position(**self.resume.state["position"])
            if self._complete(position):
                # Before on_train_begin: a no-op rerun opens no files and starts no callbacks.
                self.echo(f"run at {self.uri} is already complete (epoch {position.epoch}, global step "
                          f"{position.global_step}); nothing to do (pass --epochs N to train further)")
                history = next((s for k, s in self.resume.state["callbacks"].items() if k.endswith("-History")), {})
                return RunResult(self.uri, "already_complete", self.resume.attempt, position,
                                 history.get("history", {}), self.resume.name)
        if self.preemption.notice is not None and not self.group.multi_worker:  # during start-up: nothing to commit
            raise started_too_late(self.preemption.notice.source)  # (on several workers the first step carries it)
        # Registered before anything is written: from now on an older process of this run cannot commit.
        self.attempt = int(self.group.from_chief(self._register_attempt, 1)[0])
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
            if self.group.multi_worker:
                self._end_epoch_together(epoch_logs)
            else:
                if self.preemption.notice is not None:
                    self._flush_and_stop(epoch_logs=epoch_logs)
                if self.job.checkpoint.every_epoch:
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
        exact = self.train_batches is not None or self.train_source.infinite  # the pass cannot end before `steps`
        iterator = iter(self._distribute(dataset, steps is not None and exact))
        batch = start
        while steps is None or batch < steps:
            step_started, uploading = time.perf_counter(), self.writer.in_flight() > 0
            self.callbacks.on_train_batch_begin(batch)
            if self.group.multi_worker:
                # Steps to the epoch-end commit after this step's: as the single-worker cadence counts them.
                self._wants_commit = self._commit_requested(steps - batch - 1 if job.checkpoint.every_epoch and steps
                                                            else None)
                self.group.cast(self._vote())  # the step carries every worker's vote
            step_logs = _run_step(self.model.train_function, iterator)
            if step_logs is None:
                # The data ended (fit's first epoch, too, begins this batch first). The epoch's logs stay the
                # last step's, as in fit.
                self.train_source.stop()
                return logs, True
            votes = self.group.take_votes(step_logs)  # before the callbacks see the logs
            logs = step_logs
            self.callbacks.on_train_batch_end(batch, logs)
            self.cadence.step_done(time.perf_counter() - step_started, busy=uploading)
            batch += 1
            self._last_logs = logs
            self.position = dataclasses.replace(self.position, batch=batch, global_step=self.position.global_step + 1)
            if self.recorder.step_due(self.position.global_step):
                self.recorder.add_step(epoch, batch - 1, self.position.global_step, _pythonify(logs), self._learning_rate())
            if self.group.multi_worker:
                self._after_group_step(votes)
            else:
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
        exact = self.val_source.num_batches(self.validation_batch_size) is not None or self.val_source.infinite
        iterator = iter(self._distribute(dataset, self.validation_steps is not None and exact))
        self.val_source.on_epoch_begin()
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
        self.val_source.stop()
        if not self.model.stop_evaluating:
            self.val_source.on_epoch_end()
        logs = _pythonify(keras_compat.metrics_result_or_logs(self.model, logs))
        self.callbacks.on_test_end(logs)
        return logs

    def _flush_and_stop(self, agreement: Agreement | None = None, epoch_logs: dict | None = None) -> None:
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
        late = late_notice_warning(notice.seconds_left(), self.cadence.flush_seconds(), self.writer.last_committed)
        if late:
            self.echo(late)
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

    def _group_notice(self, agreement: Agreement | None) -> Notice:
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
                    superseded=self.writer.superseded is not None, commit=self._wants_commit)

    def _agreement(self, votes=None) -> Agreement:
        """What every worker does now: after a step (on several workers, with the `votes` that step
        carried), or at the end of an epoch."""
        agreement = self.group.agreement_from(votes) if votes is not None else self.group.agree(self._vote())
        if agreement.superseded:
            raise self.writer.superseded or SupersededError(
                "the chief (worker 0) was superseded by a later attempt of the run; this group stopped without writing")
        return agreement

    def _commit_requested(self, epoch_commit_in: int | None, cadence: bool = True) -> bool:
        """(Several workers) A commit this worker asks for now, besides the deterministic `every_steps`
        and epoch ends: an early warning it received, or, on the chief, `every_steps="auto"` coming due.

        Asked before every step (and at every epoch end, without the cadence), it travels with that
        step's votes, and every worker commits after that step: what one worker measures or learns
        alone is decided once, for all. `epoch_commit_in`: as for `Cadence.due`.
        """
        self._early_warnings += self.preemption.take_warnings()
        wanted = bool(self._early_warnings)
        if cadence and self.group.is_chief and self.cadence.auto:
            # Asked one step early: the commit comes after the step that carries the vote.
            wanted = self.cadence.due(self.position.global_step, self.writer.in_flight(), epoch_commit_in) or wanted
        return wanted

    def _after_group_step(self, votes) -> None:
        """(Several workers) After a step: stop together on a notice anywhere, commit together on a
        request anywhere or at a fixed `every_steps`."""
        agreement = self._agreement(votes)
        if agreement.stop:
            self._flush_and_stop(agreement)
        fixed = not self.cadence.auto and self.cadence.due(self.position.global_step)
        if agreement.commit or fixed:
            self._commit(early=self._announce_early_save())

    def _end_epoch_together(self, epoch_logs: dict) -> None:
        """(Several workers) At an epoch end: stop together on a notice anywhere (one during validation),
        commit together at `every_epoch` or on a request anywhere."""
        self._wants_commit = self._commit_requested(None, cadence=False)
        agreement = self._agreement()
        if agreement.stop:
            self._flush_and_stop(agreement, epoch_logs)
        if self.job.checkpoint.every_epoch or agreement.commit:
            self._commit(epoch_logs, early=self._announce_early_save())

    def _announce_early_save(self) -> bool:
        """Say which early warnings this worker's commit answers, if any; whether there were some."""
        warnings, self._early_warnings = self._early_warnings, []
        if warnings:
            self.echo(self._early_save_message(warnings))
        return bool(warnings)

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
        attempt = register_attempt(self.store.storage, resumed_from_sequence=self.resume.sequence if self.resume else 0,
                                   run_id=self.run_id)
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

    def _distribute(self, dataset: tf.data.Dataset, exact_steps: bool):
        """The strategy's input from a dataset of global batches.

        On several workers each worker feeds its replicas their part of every global batch
        (`replica_batches`); when the loop knows how many steps it takes (`exact_steps`: the
        data cannot end first), the input never runs dry, so the step does not ask every
        worker whether it still has data. Otherwise the strategy's own check makes every
        worker see the data end at the same step.
        """
        if not self.group.multi_worker:
            return self.strategy.experimental_distribute_dataset(dataset)
        parts = replica_batches(dataset, self.strategy.num_replicas_in_sync, self.group.local_replica_ids)
        if exact_steps:
            parts = parts.repeat()
        return self.strategy.distribute_datasets_from_function(lambda context: parts)

    def _save_early(self, warnings) -> None:
        """On early warnings (not yet notices): commit here, once for all of them, and train on.

        If the notice never comes nothing was lost; if it comes, or the machine
        goes without one, the work since this commit is all there is to redo.
        """
        self.echo(self._early_save_message(warnings))
        self._commit(early=True)

    def _early_save_message(self, warnings) -> str:
        p = self.position
        said = "; ".join(f"{w.source}: {w.reason}" for w in warnings)
        return (f"early warning ({said}): saving at epoch {p.epoch + 1}, batch {p.batch} "
                f"(global step {p.global_step}) and training on")

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
                              "host_copy_median_seconds": statistics.median(self.copy_seconds or [0.0]),
                              "stall_seconds": self.writer.stall_seconds,
                              "overhead": self.cadence.overhead(), "interval": self.cadence.interval.steps,
                              "step_seconds": self.cadence.measurements().step_seconds,
                              "early_saves": self.cadence.early_saves},
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
