"""The chaos harness: many SIGTERMs and SIGKILLs, one run, the same result as no interruption."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from cluster_trainer.chaos import compare_runs, run_chaos
from cluster_trainer.history import read_history
from harness import ROOT, cli_env, latest


@pytest.mark.slow
def test_mixed_interruptions_of_a_run_that_paces_its_own_checkpoints_end_bitwise_equal_with_each_history_row_once(
        tmp_path):
    # One chaos run covers both promises: bitwise equality through eight SIGTERMs and SIGKILLs, and
    # every_steps="auto" carrying what each attempt measured into the next (a second run cost ~5 min).
    messages = []
    report = run_chaos(str(ROOT / "jobs" / "mlp.py"), str(tmp_path / "run"), interruptions=8, seed=2,
                       every_steps="auto", run_args=["--devices", "2"], env=cli_env(), echo=messages.append)
    summary = report.summary() + "\n" + "\n".join(messages[-40:])
    kinds = [i.signal for i in report.interruptions]
    assert len(kinds) >= 7, summary
    assert set(kinds) == {"SIGTERM", "SIGKILL"}, summary
    # A notice loses nothing: the commit is at the batch where the process stopped.
    assert all(i.steps_rerun == 0 and i.exit_code == 75 for i in report.interruptions if i.signal == "SIGTERM"), summary
    assert report.ok, summary  # tensors bitwise, callback state, position, RNGs, histories
    # EarlyStopping ends the seed job after 9 epochs; each epoch and each 4th step is logged once.
    epochs = read_history(str(tmp_path / "run"))
    assert list(epochs["epoch"]) == list(range(9)) and report.epoch_rows == 9
    steps = read_history(str(tmp_path / "run"), steps=True)
    assert list(steps["global_step"]) == list(range(4, report.total_steps + 1, 4))
    # The interruptions show in the run columns: later attempts finished later epochs.
    assert epochs["attempt"].is_monotonic_increasing and epochs["attempt"].max() > 1
    # Each attempt started from what the ones before it measured, and counted how they ended.
    cadence = latest(tmp_path / "run").state["cadence"]
    assert cadence["policy"] == "auto" and cadence["interval"]["reason"] != "first save", cadence
    assert (cadence["interruptions"], cadence["notices"]) == (kinds.count("SIGKILL"), kinds.count("SIGTERM")), summary
    attempts = [a["attempt"] for a in cadence["attempts"]]  # those that committed, in the final checkpoint's lineage
    assert attempts == sorted(set(attempts)) and attempts[-1] == len(kinds) + 1 and len(attempts) >= 2, cadence


@pytest.mark.slow
def test_the_chaos_command_interrupts_a_two_worker_run_one_worker_at_a_time_and_it_ends_bitwise_equal(tmp_path):
    # Two `cluster-trainer run` processes per attempt under MultiWorkerMirroredStrategy on 127.0.0.1; each
    # signal goes to one of them. SIGTERM to either stops both after the same step; SIGKILL of either fails both.
    command = [sys.executable, "-m", "cluster_trainer.chaos", str(ROOT / "jobs" / "mlp.py"),
               "--storage", str(tmp_path / "run"), "--workers", "2", "--interruptions", "3", "--seed", "5",
               "--sigkill-share", "0.5", "--devices", "1", "--epochs", "2"]
    result = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"chaos: 3 interruptions of .*mlp.py \(seed 5\), \d+ steps on 2 workers", out), out
    rows = re.findall(r"^\s+\d+\s+(SIGTERM|SIGKILL)\s+([01])\s+\d+\s+\d+\s+\d+\s+(\d+)\s+(\S+)", out, re.M)
    assert len(rows) == 3, out
    assert all(rerun == "0" and code == "75" for kind, _, rerun, code in rows if kind == "SIGTERM"), out
    assert "EQUAL: every tensor bitwise" in out, out
    assert latest(tmp_path / "run").state["replica_layout"] == "2 workers x 1 device"


def test_the_comparison_finds_a_single_flipped_bit(mlp_reference):
    reference = latest(mlp_reference)
    assert compare_runs(reference, reference) == []
    key = next(k for k in reference.tensors if k.startswith("model/trainable"))
    changed = dict(reference.tensors)
    flipped = changed[key].copy()
    flipped.view(np.uint32).flat[0] ^= 1  # the last bit of the first float
    changed[key] = flipped
    assert compare_runs(reference, dataclasses.replace(reference, tensors=changed)) == [f"tensor {key} differs"]
    state = {**reference.state, "callbacks": {**reference.state["callbacks"], "extra": {}}}
    assert compare_runs(reference, dataclasses.replace(reference, state=state)) == ["callbacks state differs"]
