"""The retry policy of runs on Ray, as plain code: which outcomes start another attempt, when, and which stop."""

import pytest

from cluster_trainer.errors import ConfigError
from cluster_trainer.on_ray.retry import RetryPolicy


def test_preemptions_retry_at_once_without_limit_and_never_use_the_failure_budget():
    policy = RetryPolicy(max_failures=0)
    for number in range(1, 51):
        decision = policy.after("preempted", number, "its node was drained")
        assert decision.retry and decision.delay == 0
    assert (policy.preemptions, policy.failures) == (50, 0)
    assert "starting actor 51" in decision.message


def test_a_preemption_budget_stops_with_exit_75_once_spent():
    policy = RetryPolicy(max_preemptions=2)
    assert policy.after("preempted", 1, "drained").retry
    assert policy.after("preempted", 2, "drained").retry
    decision = policy.after("preempted", 3, "drained")
    assert (decision.retry, decision.exit_code) == (False, 75)
    assert "more than --max-preemptions 2" in decision.message


def test_failures_back_off_exponentially_up_to_a_minute_then_give_up_with_exit_1():
    policy = RetryPolicy(max_failures=8, storage="s3://bucket/run")
    delays = [policy.after("failed", n, "boom").delay for n in range(1, 9)]
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]
    decision = policy.after("failed", 9, "boom")
    assert (decision.retry, decision.exit_code) == (False, 1)
    assert "giving up" in decision.message and "s3://bucket/run" in decision.message


def test_bad_input_and_a_superseded_run_are_never_retried():
    policy = RetryPolicy()
    assert policy.after("bad_input", 1, "no such key").exit_code == 2
    assert policy.after("superseded", 1, "attempt 3 took over").exit_code == 3
    assert (policy.preemptions, policy.failures) == (0, 0)


def test_after_a_stop_request_nothing_is_retried_and_the_code_says_what_ended_the_attempt():
    policy = RetryPolicy()
    preempted = policy.after("preempted", 1, "committed at step 5", stop_reason="SIGTERM")
    assert (preempted.retry, preempted.exit_code) == (False, 75)
    assert preempted.message.startswith("stopped by SIGTERM: committed at step 5")
    assert policy.after("failed", 1, "boom", stop_reason="SIGINT").exit_code == 1


def test_the_noun_names_what_an_attempt_was():
    assert "group 1 preempted: x; starting group 2" in RetryPolicy().after("preempted", 1, "x", noun="group").message


@pytest.mark.parametrize("bad", [{"max_failures": -1}, {"max_failures": True}, {"max_preemptions": 1.5}])
def test_a_budget_that_is_not_a_count_is_one_line_of_bad_input(bad):
    with pytest.raises(ConfigError, match="must be an integer >= 0"):
        RetryPolicy(**bad)
