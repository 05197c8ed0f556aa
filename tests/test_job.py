"""The job contract: typed --set overrides, validation with errors that name the fix."""

import numpy as np
import pytest

import cluster_trainer as ct
from cluster_trainer.errors import ConfigError, JobError
from cluster_trainer.job import parse_override
from cluster_trainer.state import stable_path

CONFIG = {"lr": 0.1, "units": 64, "optimizer": "adam", "augment": False, "layers": [32, 32], "clip": None}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr=1e-3", ("lr", 0.001)),
        ("lr=1", ("lr", 1.0)),  # an int for a float key becomes a float
        ("units=128", ("units", 128)),
        ("optimizer=sgd", ("optimizer", "sgd")),
        ("optimizer='rmsprop'", ("optimizer", "rmsprop")),
        ("augment=true", ("augment", True)),
        ("layers=[64, 64, 32]", ("layers", [64, 64, 32])),
        ("clip=1.0", ("clip", 1.0)),
        ("lr=none", ("lr", None)),
    ],
)
def test_overrides_are_typed(text, expected):
    key, value = parse_override(text, CONFIG)
    assert (key, value) == expected and type(value) is type(expected[1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr", "expects key=value"),
        ("rate=0.1", "no such config key; the job's keys are: augment, clip, layers, lr, optimizer, units"),
        ("units=1.5", "expected an int like 64, got float"),
        ("augment=yes", "expected a bool"),
    ],
)
def test_bad_overrides_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_override(text, CONFIG)


def test_job_validation_names_the_field():
    data = (np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"))
    with pytest.raises(JobError, match="Job.epochs must be a positive integer, got 0"):
        ct.Job(name="x", build_model=lambda c: None, train_data=data, epochs=0)
    with pytest.raises(JobError, match="build_model must be a function"):
        ct.Job(name="x", build_model="model", train_data=data)
    with pytest.raises(JobError, match=r'every_steps must be an integer >= 1, "auto" \(paced by what the run '
                                       r"measures\) or None; got 0"):
        ct.CheckpointPolicy(every_steps=0)


def test_callbacks_may_take_the_run_context():
    data = (np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"))
    run = ct.RunContext(uri="/runs/x", files_dir="/runs/x/files")
    with_run = ct.Job(name="x", build_model=lambda c: None, train_data=data, callbacks=lambda config, run: [run.path("tb")])
    config_only = ct.Job(name="x", build_model=lambda c: None, train_data=data, callbacks=lambda config: ["cb"])
    assert with_run.make_callbacks(run) == ["/runs/x/files/tb"]
    assert config_only.make_callbacks(run) == ["cb"]


def test_variable_keys_ignore_auto_generated_names():
    assert stable_path("sequential_3/dense_12/kernel") == "sequential/dense/kernel"
    assert stable_path("adam/sequential_1_dense_2_kernel_momentum") == "adam/sequential_dense_kernel_momentum"
    assert stable_path("my_model/conv_3x3/bias") == "my_model/conv_3x3/bias"


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7"])
def test_a_seed_out_of_range_is_a_job_error(seed):
    data = (np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"))
    with pytest.raises(JobError, match="Job.seed must be an integer from 0 to 2\\*\\*32 - 1"):
        ct.Job(name="x", build_model=lambda c: None, train_data=data, seed=seed)


def test_a_string_step_interval_is_a_job_error():
    with pytest.raises(JobError, match="every_steps must be an integer"):
        ct.CheckpointPolicy(every_steps="10")


def test_auto_is_a_step_interval_and_the_overhead_budget_a_fraction():
    assert ct.CheckpointPolicy(every_steps="auto").max_overhead == 0.03
    with pytest.raises(JobError, match=r"max_overhead must be a fraction of training time between 0 and 1 \(0.03: 3%\), "
                                       r"got 3"):
        ct.CheckpointPolicy(every_steps="auto", max_overhead=3)
    with pytest.raises(JobError, match='every_steps="auto" is decided by the run'):
        ct.CheckpointPolicy(every_steps="auto").due_at_step(10)
