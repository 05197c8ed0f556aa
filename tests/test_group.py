"""A group of workers as plain code, without Ray: which sizes a run may shrink to, which groups are
refused before Ray starts, and how a group's outcome follows from its workers' outcomes."""

import pytest

from cluster_trainer.errors import ConfigError
from cluster_trainer.job import Resources
from cluster_trainer.on_ray.group import Worker, WorkerGroup, check_group, group_sizes


def test_a_group_shrinks_only_to_sizes_whose_replica_count_divides_the_global_batch():
    assert group_sizes(8, 1, batch_size=64, replicas_per_worker=1) == [8, 4, 2, 1]
    assert group_sizes(6, 2, batch_size=48, replicas_per_worker=2) == [6, 4, 3, 2]
    assert group_sizes(3, 3, batch_size=64, replicas_per_worker=1) == [3]  # the asked size is checked elsewhere


@pytest.mark.parametrize("args, message", [
    ((3, 3, Resources(), 64, 1), "--workers 3 with 1 replica(s) each makes 3 replicas, which do not divide the "
                                 "global batch size 64"),
    ((2, 3, Resources(), 64, 1), "--min-workers 3 is more than --workers 2"),
    ((0, 0, Resources(), 64, 1), "--workers must be an integer >= 1, got 0"),
    ((2, 2, Resources(num_cpus=0), 64, 1), "they ask for nothing: give --num-cpus, --num-gpus or --resource"),
    ((2, 2, Resources(label_selector={"ray.io/node-id": "abc"}), 64, 1),
     "--label-selector ray.io/node-id=abc allows 1 node(s), but the 2 workers of a run each need a node of their own"),
    ((3, 3, Resources(label_selector={"ray.io/node-id": "in(a,b)"}), 48, 1), "allows 2 node(s)"),
])
def test_a_group_that_cannot_run_is_one_line_of_bad_input(args, message):
    with pytest.raises(ConfigError) as error:
        check_group(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_groups_that_can_run_pass_and_one_worker_keeps_todays_rules():
    assert check_group(2, 1, Resources(label_selector={"ray.io/node-id": "!abc", "pool": "spot"}), 64, 1) == [2, 1]
    assert check_group(1, 1, Resources(num_cpus=0), 64, 3) == [1]  # 3 devices on one worker: the loop's business


def group_with(*outcomes, drained=()):
    """A group of len(outcomes) workers on nodes n0, n1, ... that ended as given (None: still running)."""
    group = WorkerGroup(4, [len(outcomes)], {}, Resources())
    group.workers = [Worker(i, actor=None, where={"node_id": f"n{i}"}, outcome=outcome)
                     for i, outcome in enumerate(outcomes)]
    group.drained = {node: 0 for node in drained}
    return group


def test_the_chiefs_completion_is_the_groups_even_if_a_straggler_was_stopped():
    done = ("done", "", {"uri": "u"})
    assert group_with(done, None).outcome() == done
    assert group_with(done, ("failed", "worker 1: boom", None)).outcome() == done


def test_a_drained_node_explains_the_failures_around_it():
    lost = ("lost", "node n1 of worker 1 went away after a drain (...)", None)
    failed = ("failed", "worker 0: UnavailableError: peer gone", None)
    assert group_with(failed, lost, drained=["n1"]).outcome()[0] == "preempted"


def test_a_worker_lost_without_notice_fails_the_group_and_is_named_before_the_others_it_failed():
    lost = ("lost", "worker 1 or its node n1 died without notice (SIGKILL)", None)
    assert group_with(None, lost).outcome() == ("failed", lost[1], None)
    peer_gone = ("failed", "worker 0 lost the rest of its group (UnavailableError: ...)", None)
    assert group_with(peer_gone, lost).outcome() == ("failed", lost[1], None)


def test_bad_input_and_a_superseded_run_decide_before_anything_else():
    preempted = ("preempted", "worker 1: preempted", None)
    assert group_with(("bad_input", "worker 0: no such key", None), preempted).outcome()[0] == "bad_input"
    assert group_with(preempted, ("superseded", "worker 1: attempt 5 took over", None)).outcome()[0] == "superseded"


def test_a_chief_that_never_finished_after_the_others_did_is_a_failure():
    assert group_with(None, ("done", "", {})).outcome() == ("failed", "the chief did not finish", None)


def test_messages_name_an_actor_for_one_worker_and_a_group_for_several():
    assert WorkerGroup(3, [1], {}, Resources()).name == "actor 3"
    assert WorkerGroup(3, [2, 1], {}, Resources()).name == "group 3"
