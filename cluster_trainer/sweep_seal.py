"""A sweep's Ray Tune state, sealed: continuing a sweep unpickles only what this sweep's own driver wrote.

Ray Tune keeps a sweep's state as pickles in `<sweep>/tune/`, and continuing the
sweep (`Tuner.restore`) unpickles them, which runs whatever code they name.
Whoever can write the sweep's prefix (a shared bucket) could otherwise run code
on the driver. What Ray Tune 2.60 unpickles, checked in its source:

- `tune/tuner.pkl`: the Tuner (TuneConfig with the searcher and scheduler as
  first created, RunConfig, the search space), read by `Tuner.restore`;
- `tune/experiment_state-<session>.json`: every trial's state, JSON with
  cloudpickled values inside, read by `Tuner.restore` (and its
  ExperimentAnalysis);
- `tune/searcher-state-<session>.pkl`, `tune/search_gen_state-<session>.json`,
  `tune/basic-variant-state-<session>.json`, `tune/callback-states-<session>.pkl`:
  the searcher's and callbacks' state (pickles, whatever the extension);
- `tune/<trial>/error.pkl`: a failed trial's exception, read when the results
  are gathered (at the end of every `fit`, not only after a restore).

The driver records an HMAC-SHA256 of every version of these files it writes
(`tuner.pkl` once it exists; the others when Tune checkpoints the experiment,
from Tune's local staging directory, before Tune uploads them) in
`<sweep>/tune-seal.json`, itself authenticated with the same key, and on a
local or NFS path keeps a copy of the newest version in `<sweep>/tune-sealed/`. Before a restore, and
before the results of `fit` are read, every such file in storage must match a
recorded version, else the sweep is refused in one line and nothing is
unpickled. One exception: a file that is the start of the newest sealed version
(Tune uploads in place; its driver died mid-upload to a local or NFS path) is
replaced by the sealed copy, with a warning.

The key is a local file only drivers can read, `CLUSTER_TRAINER_SWEEP_KEY_FILE`
(default `~/.config/cluster-trainer/sweep.key`, created with mode 0600 when a
sweep starts and none exists). A driver on another machine (a CronJob pod)
continues the sweep only with the same key: mount it from a Kubernetes Secret
as a file and point the variable at it. The key never goes into storage, a
pickle, a log or an actor's environment (the variable holds a path).

Example:
    >>> import tempfile, os
    >>> from cluster_trainer.storage import Storage
    >>> sweep_dir = tempfile.mkdtemp()
    >>> seal = TuneStateSeal(Storage(sweep_dir), key=b"k" * 32)
    >>> seal.record("tune/tuner.pkl", b"pickled tuner")
    >>> os.makedirs(os.path.join(sweep_dir, "tune"))
    >>> open(os.path.join(sweep_dir, "tune", "tuner.pkl"), "wb").write(b"pickled tuner")
    13
    >>> seal.verify()
    >>> open(os.path.join(sweep_dir, "tune", "tuner.pkl"), "wb").write(b"something else")
    14
    >>> seal.verify()
    Traceback (most recent call last):
    ...
    cluster_trainer.sweep_seal.SweepStateError: the Ray Tune state tune/tuner.pkl of the sweep at ... was not written by this sweep's driver (it matches none of the versions the driver sealed): continuing would unpickle it, which runs code. Start the sweep again at a new --storage; each trial's run under ... stays readable (`cluster-trainer history`)
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading

from ray import tune

from cluster_trainer.errors import ClusterTrainerError
from cluster_trainer.storage import Storage

log = logging.getLogger(__name__)

KEY_FILE_ENV = "CLUSTER_TRAINER_SWEEP_KEY_FILE"
SEAL_FILE = "tune-seal.json"
TUNE_DIR = "tune"
# The newest sealed version of each file, written atomically beside Tune's state on a local or NFS
# path: Tune uploads its files there in place, so a driver killed mid-upload leaves a torn file, which
# the copy puts back. Object stores write whole objects: no copies there (they would double the PUTs).
SEALED_COPIES = "tune-sealed"
# Versions of each file kept in the seal: Tune uploads in the background, so storage may hold
# a version older than the newest sealed one when the driver dies.
KEEP_VERSIONS = 4
# Reads from the sweep's prefix are bounded, as every read of stored input is: a larger state file is
# refused unread (a symlink to /dev/zero is refused before), a larger seal fails its MAC. Tune's
# experiment state grows with the trials, a few kB each, so 1000 trials stay far below this.
MAX_STATE_FILE_BYTES = 256 * 2**20
MAX_SEAL_BYTES = 16 * 2**20
# What Tune 2.60 unpickles: at the top of its experiment directory (tuner.pkl, experiment_state-*.json,
# searcher-state-*.pkl, search_gen_state-*.json, basic-variant-state-*.json, callback-states-*.pkl, and
# any other pickle), and in each trial's directory, error.pkl (params.pkl there is written, never read).
_EXPERIMENT_PICKLES = ("*.pkl", "*state-*.json", "*states-*.json")
_TRIAL_PICKLES = ("error.pkl",)


class SweepStateError(ClusterTrainerError):
    """The sweep's Ray Tune state cannot be trusted (or checked): nothing of it was unpickled."""


def key_path() -> str:
    """Where the sealing key is: `CLUSTER_TRAINER_SWEEP_KEY_FILE`, else `~/.config/cluster-trainer/sweep.key`."""
    explicit = os.environ.get(KEY_FILE_ENV, "").strip()
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "cluster-trainer", "sweep.key")


def load_key(create: bool) -> bytes:
    """The sealing key; with `create`, a new random one is written (mode 0600) if there is none."""
    path = key_path()
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except FileNotFoundError:
        if not create:
            raise SweepStateError(
                f"no sweep key at {path} to check this sweep's sealed Ray Tune state: set {KEY_FILE_ENV} to the key "
                "file of the driver that started the sweep (e.g. a Kubernetes Secret mounted as a file)") from None
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = secrets.token_hex(32).encode()
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another driver created it just now
            return load_key(create=False)
        with os.fdopen(descriptor, "wb") as f:
            f.write(key + b"\n")
    except OSError as e:
        raise SweepStateError(f"cannot read the sweep key {path}: {e.strerror or e}; set {KEY_FILE_ENV} to a "
                              "readable key file") from None
    if len(key) < 16:
        raise SweepStateError(f"the sweep key {path} is shorter than 16 bytes: put at least 32 random bytes in it")
    return key


class TuneStateSeal:
    """The HMACs of the Ray Tune state files this sweep's driver wrote, kept in `<sweep>/tune-seal.json`.

    Args:
        store: the sweep's storage (`<sweep>/`).
        key: the sealing key (`load_key`).
    """

    def __init__(self, store: Storage, key: bytes):
        self.store = store
        self._key = key
        self._lock = threading.Lock()
        self._files: dict[str, list[str]] | None = None

    def _mac(self, name: str, data: bytes) -> str:
        return hmac.new(self._key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def _seal_mac(self, files: dict) -> str:
        return self._mac(SEAL_FILE, json.dumps(files, sort_keys=True).encode())

    def _load(self) -> dict[str, list[str]]:
        """The sealed versions (an empty seal when there is none yet); refuses a seal this key did not write."""
        if self._files is None:
            try:
                raw = self.store.get(SEAL_FILE, limit=MAX_SEAL_BYTES)
            except FileNotFoundError:
                self._files = {}
                return self._files
            try:
                document = json.loads(raw)
                files, mac = document["files"], document["mac"]
                valid = isinstance(files, dict) and hmac.compare_digest(str(mac), self._seal_mac(files))
            except (ValueError, KeyError, TypeError):
                valid = False
            if not valid:
                raise SweepStateError(
                    f"{self.store.path(SEAL_FILE)} was not written with this machine's sweep key ({key_path()}): set "
                    f"{KEY_FILE_ENV} to the key file of the driver that started the sweep (e.g. a Kubernetes Secret "
                    "mounted as a file), or start the sweep again at a new --storage")
            self._files = {str(k): [str(m) for m in v] for k, v in files.items() if isinstance(v, list)}
        return self._files

    def record(self, name: str, data: bytes) -> None:
        """Seal this version of `name` (relative to the sweep); writes the seal if it is new."""
        self.record_many({name: data})

    def record_many(self, versions: dict[str, bytes]) -> None:
        with self._lock:
            files = self._load()
            changed = {}
            for name, data in versions.items():
                mac = self._mac(name, data)
                kept = files.setdefault(name, [])
                if mac not in kept:
                    kept.insert(0, mac)
                    del kept[KEEP_VERSIONS:]
                    changed[f"{SEALED_COPIES}/{name}"] = data
            if changed:
                if self.store.is_local:
                    self.store.put_many(changed)  # the copies first: a copy the seal does not name is never used
                self.store.put(SEAL_FILE, json.dumps({"files": files, "mac": self._seal_mac(files)},
                                                     sort_keys=True).encode())

    def record_stored(self, name: str) -> None:
        """Seal `name` as it is in storage now (Tune writes `tuner.pkl` there itself)."""
        self.record(name, self._read_state_file(name))

    def _read_state_file(self, name: str) -> bytes:
        data = self.store.get(name, limit=MAX_STATE_FILE_BYTES + 1)
        if len(data) > MAX_STATE_FILE_BYTES:
            raise SweepStateError(
                f"the Ray Tune state {name} of the sweep at {self.store.uri} is larger than "
                f"{MAX_STATE_FILE_BYTES // 2**20} MiB, more than any sweep's: it is not read. Start the sweep again "
                "at a new --storage")
        return data

    def record_staging(self, staging_dir: str) -> None:
        """Seal what Tune just wrote to its local staging directory, before it uploads it to `<sweep>/tune/`."""
        names = [os.path.relpath(path, staging_dir) for pattern in ("*", "*/*")
                 for path in glob.glob(os.path.join(staging_dir, pattern)) if os.path.isfile(path)]
        versions = {}
        for name in _unpickled_by_tune(names):
            with open(os.path.join(staging_dir, name), "rb") as f:
                versions[f"{TUNE_DIR}/{name}"] = f.read()
        if versions:
            self.record_many(versions)

    def verify(self) -> None:
        """Refuse (`SweepStateError`, one line) if any file Tune would unpickle is not a sealed version."""
        prefix = f"{TUNE_DIR}/"
        stored = [name[len(prefix):] for name in self.store.list_files(TUNE_DIR, maxdepth=2) if name.startswith(prefix)]
        names = [prefix + name for name in _unpickled_by_tune(stored)]
        if not names:
            return
        files = self._load()
        if not files:
            raise SweepStateError(
                f"the Ray Tune state of the sweep at {self.store.uri} is not sealed ({SEAL_FILE} is missing: written "
                "by another program, or by a cluster-trainer older than the seal): continuing would unpickle it, "
                "which runs code. Start the sweep again at a new --storage")
        for name in names:
            stored = self._read_state_file(name)
            if self._mac(name, stored) not in files.get(name, []) and not self._put_back_torn(name, stored, files):
                run_dir = self.store.path("<trial id>")
                raise SweepStateError(
                    f"the Ray Tune state {name} of the sweep at {self.store.uri} was not written by this sweep's "
                    "driver (it matches none of the versions the driver sealed): continuing would unpickle it, which "
                    f"runs code. Start the sweep again at a new --storage; each trial's run under {run_dir} stays "
                    "readable (`cluster-trainer history`)")

    def _put_back_torn(self, name: str, stored: bytes, files: dict[str, list[str]]) -> bool:
        """If `stored` is the start of the newest sealed version of `name` (Tune's upload cut short when
        its driver died), write that version over it and say so; else False (any other content is refused)."""
        try:
            copy = self._read_state_file(f"{SEALED_COPIES}/{name}")
        except (OSError, ClusterTrainerError):  # no copy, or one that is not a plain file of the sweep's
            return False
        if len(stored) >= len(copy) or not copy.startswith(stored) or self._mac(name, copy) not in files.get(name, []):
            return False
        self.store.put(name, copy)
        log.warning("the Ray Tune state %s of the sweep at %s was cut short (%d of %d bytes: its driver died while "
                    "uploading it); put back the version the driver sealed", name, self.store.uri, len(stored), len(copy))
        return True


def _unpickled_by_tune(names: list[str]) -> list[str]:
    """Of file names relative to Tune's experiment directory, those Ray Tune unpickles (`_EXPERIMENT_PICKLES`
    at its top, `_TRIAL_PICKLES` in a trial's directory).

    Example:
        >>> _unpickled_by_tune(["tuner.pkl", "experiment_state-2026.json", ".validate_storage_marker",
        ...                     "_trial_1/error.pkl", "_trial_1/params.json", "_trial_1/checkpoint_000000/reported"])
        ['_trial_1/error.pkl', 'experiment_state-2026.json', 'tuner.pkl']
    """
    def matches(name: str, patterns: tuple) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return sorted(name for name in names if ("/" not in name and matches(name, _EXPERIMENT_PICKLES)) or (
        name.count("/") == 1 and matches(name.split("/")[1], _TRIAL_PICKLES)))


# The seal of the sweep this process drives. The Tune callback finds it here rather than holding it:
# Tune pickles its callbacks into tuner.pkl, in storage, and the key must not go there.
_ACTIVE: TuneStateSeal | None = None


@contextlib.contextmanager
def active(seal: TuneStateSeal):
    """Make `seal` the one `SealCallback` records into while the sweep runs."""
    global _ACTIVE
    _ACTIVE = seal
    try:
        yield seal
    finally:
        _ACTIVE = None


class SealCallback(tune.Callback):
    """Seals Tune's state each time Tune checkpoints the experiment, and checks it before `fit` reads it back.

    Tune asks its callbacks for their state (`get_state`) right after writing the
    experiment state and the searcher's to its local staging directory, before it
    uploads them: the moment to seal them. The seal itself is found in this module
    (`active`), never held: Tune pickles its callbacks into tuner.pkl.
    """

    def __init__(self):
        self._staging: str | None = None

    def __getstate__(self):
        return {"_staging": None}

    def _find_staging(self, trials) -> None:
        # Every trial's storage context knows the driver's staging directory (a restored run reuses its trials').
        if self._staging is None and trials:
            self._staging = trials[0].storage.experiment_driver_staging_path

    def on_step_begin(self, iteration, trials, **info):
        self._find_staging(trials)

    def get_state(self):
        if _ACTIVE is not None and self._staging is not None and os.path.isdir(self._staging):
            _ACTIVE.record_staging(self._staging)
        return None  # nothing of ours for Tune to pickle

    def on_experiment_end(self, trials, **info):
        self._find_staging(trials)  # a continued sweep with nothing left to run took no step
        if _ACTIVE is not None:
            self.get_state()
            _ACTIVE.verify()  # Tune reads failed trials' error.pkl next, from storage
