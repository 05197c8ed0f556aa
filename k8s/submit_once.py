"""Submit one scheduled run to a Ray cluster exactly once, attach to it if it exists, follow it to the end.

A Kubernetes CronJob runs this in a small pod (`k8s/cronjob-ray-submit.yaml`).
Every pod of one scheduled run gets the same submission id and the same
`--storage` URI, both made from the Job's name, which the CronJob controller
derives from the scheduled time (`<cronjob>-<scheduled time in Unix minutes>`)
and the pod reads through the downward API. So a pod that replaces an evicted
or failed one finds the run its predecessor submitted, instead of starting a
second run (Ray would also refuse a reused submission id):

- no Ray job with the id: submit the command, as `ray job submit
  --submission-id ID -- COMMAND` does, and follow it;
- PENDING or RUNNING: follow it. The run lives on the Ray cluster; the pod that
  submitted it going away did not stop it;
- SUCCEEDED: exit 0;
- FAILED with exit code 75 (cluster-trainer was preempted after committing its
  state) or because its driver was lost with its node: submit the same command
  again as `ID-2`, `ID-3`, ... (at most `--max-attempts` in all). It has the
  same `--storage`, so it resumes at the next batch;
- FAILED otherwise, or STOPPED (someone ran `ray job stop`): exit 2. A retry
  would repeat the failure or undo a deliberate stop; the Job's
  podFailurePolicy turns exit code 2 into a failed Job without retries.

Anything unexpected (the Ray head unreachable, say) exits 1 and leaves the
next step to the Job's backoffLimit: the next pod starts over from the ids.

The pod follows the run until it ends because `concurrencyPolicy: Forbid`
keeps two scheduled runs apart only while a Job is active. On SIGTERM (an
eviction, a node drain) it exits without touching the run.

    python submit_once.py --address http://cluster-trainer-head-svc:8265 --submission-id mlp-nightly-29924760 \\
        -- cluster-trainer run /opt/cluster-trainer/jobs/mlp.py --storage gs://BUCKET/runs/mlp-nightly-29924760
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time

EXIT_SUCCEEDED = 0
EXIT_RETRY = 1  # let the Job's backoffLimit decide
EXIT_FINAL = 2  # the podFailurePolicy fails the Job: retrying cannot help
# cluster-trainer's "preempted; state committed; run the same command again" (cluster_trainer.errors).
EXIT_PREEMPTED = 75
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def attempt_id(submission_id: str, attempt: int) -> str:
    """`ID` for the first attempt, `ID-2`, `ID-3`, ... for resubmissions of the same run."""
    return submission_id if attempt == 1 else f"{submission_id}-{attempt}"


def newest_attempt(client, submission_id: str):
    """(attempt number, its job details or None): the newest attempt the cluster knows, else attempt 1."""
    jobs = {job.submission_id: job for job in client.list_jobs() if job.submission_id}
    attempt = 1
    while attempt_id(submission_id, attempt + 1) in jobs:
        attempt += 1
    return attempt, jobs.get(attempt_id(submission_id, attempt))


def status_of(info) -> str:
    return getattr(info.status, "value", info.status)  # JobStatus is a str Enum; fakes may use str


def resumable(info) -> bool:
    """The attempt stopped with its state committed, or lost its driver: the same command resumes the run."""
    error_type = getattr(info.error_type, "value", info.error_type)
    return info.driver_exit_code == EXIT_PREEMPTED or error_type == "JOB_SUPERVISOR_ACTOR_DIED"


def follow(client, submission_id: str, poll_seconds: float, sleep=time.sleep, echo=print):
    """Print the job's logs while it runs, then return its details once it is in a terminal state."""
    try:
        asyncio.run(_print_logs(client, submission_id))
    except Exception as e:  # the log stream is for people reading the pod's log; the status decides
        echo(f"submit_once: log stream of {submission_id} ended: {e}")
    while True:
        info = client.get_job_info(submission_id)
        if status_of(info) in TERMINAL:
            return info
        sleep(poll_seconds)


async def _print_logs(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="submit_once.py", description=__doc__.split("\n\n")[0],
        epilog="Everything after -- is the command to run on the cluster.")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the Ray dashboard, e.g. http://cluster-trainer-head-svc:8265")
    parser.add_argument("--submission-id", required=True, help="the run's id, the same in every pod of the run")
    parser.add_argument("--max-attempts", type=int, default=10,
                        help="submissions of the run at most, counting the first (default 10)")
    parser.add_argument("--poll-seconds", type=float, default=30.0,
                        help="how often to ask for the status once the log stream ends (default 30)")
    args = parser.parse_args(own)
    if not command:
        parser.error("give the command to run after --, e.g. -- cluster-trainer run JOB.py --storage URI")
    if not args.address:
        parser.error("--address (or RAY_API_SERVER_ADDRESS) is required")
    return args, command


def main(argv: list[str] | None = None, client=None, sleep=time.sleep, echo=print) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    entrypoint = shlex.join(command)  # what `ray job submit -- COMMAND` sends
    try:
        if client is None:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(args.address)
        attempt, info = newest_attempt(client, args.submission_id)
        while True:
            submission_id = attempt_id(args.submission_id, attempt)
            if info is None:
                client.submit_job(entrypoint=entrypoint, submission_id=submission_id)
                echo(f"submit_once: submitted {submission_id}: {entrypoint}")
                info = follow(client, submission_id, args.poll_seconds, sleep, echo)
            elif status_of(info) not in TERMINAL:
                echo(f"submit_once: {submission_id} is already {status_of(info)} (an earlier pod submitted it); "
                     "following it")
                info = follow(client, submission_id, args.poll_seconds, sleep, echo)
            status = status_of(info)
            if status == "SUCCEEDED":
                echo(f"submit_once: {submission_id} succeeded")
                return EXIT_SUCCEEDED
            ended = f"{submission_id} {status} (exit code {info.driver_exit_code}): {info.message}"
            if status != "FAILED" or not resumable(info):
                echo(f"submit_once: {ended}; not resubmitting")
                return EXIT_FINAL
            if attempt >= args.max_attempts:
                echo(f"submit_once: {ended}; that was attempt {attempt} of --max-attempts {args.max_attempts}")
                return EXIT_FINAL
            attempt, info = attempt + 1, None
            echo(f"submit_once: {ended}; resuming it as {attempt_id(args.submission_id, attempt)}")
    except Exception as e:  # unreachable head, HTTP errors, a racing duplicate submission: retry from scratch
        echo(f"submit_once: {type(e).__name__}: {e}")
        return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main())
