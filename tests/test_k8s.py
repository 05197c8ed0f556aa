"""The Kubernetes manifests in k8s/: valid, offline, and right about preemption.

Schemas first: core kinds against kubernetes-validate's bundled Kubernetes schemas, strict (an
unknown field fails); KubeRay kinds against the v1 openAPIV3Schema of the KubeRay v1.7.0 CRDs in
tests/k8s_data/, made just as strict. Then what no schema says: every command a manifest runs is one
the CLI accepts (parsed with its own parser), grace periods cover the drain and the flush, the
preStop hook drains with flags this Ray accepts, Jobs do not spend their backoffLimit on
preemptions, scheduled runs get one id and one storage URI per schedule, the image is one
repository and version built from this project, and credentials come from service accounts.
k8s/submit_once.py, the CronJob's submitter, is run against a fake Ray job client.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import inspect
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
import types
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cluster_trainer.cli import build_parser
from cluster_trainer.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parent / "k8s_data" / "kuberay-crds"
# The oldest Kubernetes the manifests are for: podFailurePolicy is GA from 1.31 (beta, on by default,
# from 1.26); CronJob timeZone and the batch.kubernetes.io/job-name pod label exist from 1.27.
KUBERNETES_VERSION = "1.31"
INSTALL_DIR = "/opt/cluster-trainer/"  # k8s/Dockerfile's WORKDIR
SERVICE_ACCOUNT = "cluster-trainer"

# The preemption budget (see the comments in k8s/raycluster-gke.yaml):
PRESTOP_CONNECT_SECONDS = 5  # `ray drain-node` connects and marks the node draining (~2 s measured)
EXIT_SECONDS = 10  # processes exit between SIGTERM's work and SIGKILL
GKE_SPOT_POD_SECONDS = 15  # GKE gives a Spot VM's pods 15 s of its 30 s notice
AWS_SPOT_NOTICE_SECONDS = 120  # EC2's Spot interruption notice
DRAIN_HANDLER_SECONDS = 10  # Karpenter / the Node Termination Handler reacting to that notice
RAY_DRAIN_DEFAULT_SECONDS = 30.0  # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S when unset

SAMPLE_MINUTES = 29924760  # 2026-11-24 02:00 UTC in Unix minutes: a CronJob's Job name suffix

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses the 2 MB CRDs in 0.3 s, not 2 s


# -- reading the manifests ----------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, document) for every YAML document in k8s/."""
    out = []
    for path in manifest_files():
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if doc is not None:
                out.append((path.name, doc))
    return tuple(out)


def docs_of(*kinds: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc["kind"] in kinds]


def where(name: str, doc: dict) -> str:
    return f"{name}: {doc['kind']}/{doc['metadata']['name']}"


def ray_cluster_specs(doc: dict) -> list[dict]:
    """The Ray clusters a document makes (a RayJob with a clusterSelector makes none: it uses one)."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def pod_specs(doc: dict):
    """(role, pod spec) of every pod a document makes: head/worker (Ray), job (Jobs and CronJobs)."""
    for spec in ray_cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield "worker", group["template"]["spec"]
    if doc["kind"] == "CronJob":
        yield "job", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc["kind"] == "Job":
        yield "job", doc["spec"]["template"]["spec"]


def job_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]]
    if doc["kind"] == "Job":
        return [doc["spec"]]
    return []


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def spot_cloud(pod: dict) -> str | None:
    """The cloud ("gke" or "eks") whose Spot nodes alone the pod may run on, else None."""
    if pod.get("nodeSelector", {}).get("cloud.google.com/gke-spot") == "true":
        return "gke"
    terms = pod.get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    spot = {("eks.amazonaws.com/capacityType", "SPOT"), ("karpenter.sh/capacity-type", "spot")}
    if terms and all(any((e["key"], v) in spot for e in t["matchExpressions"] if e["operator"] == "In"
                         for v in e["values"]) for t in terms):
        return "eks"
    return None


def on_demand_only(pod: dict) -> bool:
    """The pod is kept off Spot nodes (GKE Spot and preemptible, EKS managed Spot and Karpenter Spot)."""
    terms = pod.get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    keeps_off = {("cloud.google.com/gke-spot", "DoesNotExist", None),
                 ("eks.amazonaws.com/capacityType", "In", ("ON_DEMAND",)),
                 ("karpenter.sh/capacity-type", "In", ("on-demand",))}
    return bool(terms) and all(
        any((e["key"], e["operator"], tuple(e["values"]) if "values" in e else None) in keeps_off
            for e in t["matchExpressions"]) for t in terms)


# -- commands: what each manifest runs ----------------------------------------------------------


KUBELET_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
JOB_NAME_FIELD = "metadata.labels['batch.kubernetes.io/job-name']"


def expand_kubelet_refs(text: str, container: dict, cronjob: str | None) -> str:
    """`$(VAR)` expanded as the kubelet does for a pod of a CronJob's Job scheduled at SAMPLE_MINUTES.

    A variable the container does not define stays `$(VAR)`, as the kubelet leaves it; a downward-API
    field other than the Job name becomes `<field>`.
    """
    env = {e["name"]: e for e in container.get("env", [])}

    def value(match):
        var = env.get(match.group(1))
        if var is None:
            return match.group(0)
        if "value" in var:
            return var["value"]
        field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
        return f"{cronjob}-{SAMPLE_MINUTES}" if field == JOB_NAME_FIELD and cronjob else f"<{field}>"

    return KUBELET_REF.sub(value, text)


def trainer_commands():
    """(where, command, pod spec, container, role) of every trainer command in k8s/, as it will run.

    A container running `cluster-trainer ...` or `python -m cluster_trainer ...` (role head, worker
    or job); what the CronJob's submitter submits to Ray, the part after its `--` ("submitted"); a
    RayJob's entrypoint ("rayjob"; no pod or container: it runs on the head).
    """
    for name, doc in documents():
        if doc["kind"] == "RayJob":
            yield where(name, doc), shlex.split(doc["spec"]["entrypoint"]), None, None, "rayjob"
        cronjob = doc["metadata"]["name"] if doc["kind"] == "CronJob" else None
        for role, pod in pod_specs(doc):
            for container in pod["containers"]:
                argv = [expand_kubelet_refs(a, container, cronjob)
                        for a in container.get("command", []) + container.get("args", [])]
                label = f"{where(name, doc)} container {container['name']}"
                if argv[:1] == ["python"] and argv[1].endswith("submit_once.py"):
                    yield label, argv[argv.index("--") + 1:] if "--" in argv else [], pod, container, "submitted"
                elif argv[:1] == ["cluster-trainer"] or argv[:3] == ["python", "-m", "cluster_trainer"]:
                    yield label, argv, pod, container, role


def strip_program(argv: list[str]) -> list[str]:
    """The arguments after `cluster-trainer` or `python -m cluster_trainer`."""
    if argv[:1] == ["cluster-trainer"]:
        return argv[1:]
    if argv[:3] == ["python", "-m", "cluster_trainer"]:
        return argv[3:]
    pytest.fail(f"not a cluster-trainer command: {argv}")


@functools.cache
def run_options() -> frozenset[str]:
    """Every option string of `cluster-trainer run`."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return frozenset(o for action in commands.choices["run"]._actions for o in action.option_strings)


def parse_cli(label: str, command: list[str]):
    """The CLI's own parser's verdict on a command (argparse prints the reason and exits 2)."""
    argv = strip_program(command)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{label}: cluster-trainer rejects {shlex.join(argv)}:\n{err.getvalue()}")


TRAINER_COMMANDS = list(trainer_commands())


# -- schemas ------------------------------------------------------------------------------------


def core_documents():
    return [(name, doc) for name, doc in documents() if not doc["apiVersion"].startswith("ray.io/")]


def kuberay_documents():
    return [(name, doc) for name, doc in documents() if doc["apiVersion"].startswith("ray.io/")]


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def strict(schema):
    """A copy of a CRD's OpenAPI schema that rejects unknown fields, as `kubectl apply` (strict field
    validation) does: an object schema that lists its properties gets `additionalProperties: false`,
    unless it has `x-kubernetes-preserve-unknown-fields: true` or already says what else it takes."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        if crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    assert v["served"], f"KubeRay v1.7.0 does not serve {kind} {version}"
                    return strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind} {version} in {CRDS}")


def cel_fields(schema: dict, value, path: str = ""):
    """Fields set in `value` whose schema carries CEL rules (x-kubernetes-validations), which jsonschema
    cannot evaluate."""
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            sub = schema["properties"].get(key)
            if sub is not None:
                if "x-kubernetes-validations" in sub:
                    yield f"{path}.{key}"
                yield from cel_fields(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from cel_fields(schema["items"], item, f"{path}[{i}]")


def kuberay_errors(doc: dict) -> list[str]:
    _, version = doc["apiVersion"].split("/")
    schema = crd_schema(doc["kind"], version)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    errors += [f"{path}: has CEL rules this test cannot check; check them by hand or avoid the field"
               for path in cel_fields(schema, doc)]
    try:  # the CRD says only `metadata: {type: object}`; the API server checks it as ObjectMeta
        validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    except kubernetes_validate.ValidationError as e:
        errors.append(f"metadata: {e.message}")
    return errors


@pytest.mark.parametrize("name, doc", core_documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_core_kinds_validate_strictly(name, doc):
    try:
        validate_core(doc)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where(name, doc)}: {'.'.join(map(str, e.absolute_path))}: {e.message}")


@pytest.mark.parametrize("name, doc", kuberay_documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_kinds_validate_against_the_crds(name, doc):
    assert doc["apiVersion"] == "ray.io/v1", f"{where(name, doc)}: use the v1 API (KubeRay stores v1)"
    errors = kuberay_errors(doc)
    assert not errors, f"{where(name, doc)}:\n  " + "\n  ".join(errors)


def test_the_manifests_cover_the_issue():
    kinds = sorted({doc["kind"] for _, doc in documents()})
    assert kinds == ["CronJob", "RayCluster", "RayJob", "ServiceAccount"], kinds
    assert {spot_cloud(pod) for _, doc in docs_of("RayCluster") for role, pod in pod_specs(doc)
            if role == "worker"} == {"gke", "eks"}, "a RayCluster with Spot workers for each of GKE and EKS"
    modes = {"no-ray" if "--no-ray" in argv else "ray" for _, argv, *_ in TRAINER_COMMANDS}
    assert modes == {"ray", "no-ray"}, "runs on Ray, and a run in a plain pod"
    assert {role for *_, role in TRAINER_COMMANDS} == {"rayjob", "submitted", "job"}


def test_schema_checks_catch_unknown_and_wrong_fields():
    """The checks above can fail: a typo, a wrong type and a bad core field are all reported."""
    _, cluster = docs_of("RayCluster")[0]
    broken = copy.deepcopy(cluster)
    worker = broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["terminationGracePeriodSecond"] = worker.pop("terminationGracePeriodSeconds")  # typo
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    broken["metadata"]["lables"] = {"a": "b"}
    errors = "\n".join(kuberay_errors(broken))
    assert "terminationGracePeriodSecond" in errors and "'two'" in errors and "lables" in errors, errors

    _, cronjob = docs_of("CronJob")[0]
    broken = copy.deepcopy(cronjob)
    broken["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]["onPodCondition"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken)

    # x-kubernetes-preserve-unknown-fields keeps an object open, as on the API server.
    schema = strict({"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "closed": {"type": "object", "properties": {"a": {}}}}})
    assert jsonschema.Draft7Validator(schema).is_valid({"open": {"b": 1}})
    assert not jsonschema.Draft7Validator(schema).is_valid({"closed": {"b": 1}})


# -- commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize("label, argv, pod, container, role", TRAINER_COMMANDS, ids=[c[0] for c in TRAINER_COMMANDS])
def test_commands_are_ones_the_cli_accepts(label, argv, pod, container, role):
    args = parse_cli(label, argv)
    assert args.command == "run", f"{label}: {argv}"
    # argparse also takes unique prefixes (--stor); a later option could make one ambiguous.
    abbreviated = [a for a in strip_program(argv) if a.startswith("--") and a.partition("=")[0] not in run_options()]
    assert not abbreviated, f"{label}: spell options out: {abbreviated}"
    assert args.job.startswith(INSTALL_DIR), f"{label}: job files are in the image at {INSTALL_DIR}"
    assert re.match(r"(gs|s3)://", args.storage), f"{label}: a run on Kubernetes lives in an object store"


def target_clusters(label: str, container: dict | None) -> list[dict]:
    """The Ray clusters a command on a head runs on: a RayJob's own, or the one its clusterSelector
    names; for the CronJob's submitter, every RayCluster whose head service its --address names."""
    if container is None:
        (job,) = [doc for name, doc in docs_of("RayJob") if where(name, doc) == label]
        if "rayClusterSpec" in job["spec"]:
            return [job["spec"]["rayClusterSpec"]]
        name = job["spec"]["clusterSelector"]["ray.io/cluster"]
    else:
        (address,) = [a for a in container["args"] if a.startswith("--address=")]
        name = re.fullmatch(r"--address=http://(.+)-head-svc:8265", address)[1]
    clusters = [doc["spec"] for _, doc in docs_of("RayCluster") if doc["metadata"]["name"] == name]
    assert clusters, f"{label}: no RayCluster named {name} in k8s/"
    return clusters


@pytest.mark.parametrize("label, argv, pod, container, role", TRAINER_COMMANDS, ids=[c[0] for c in TRAINER_COMMANDS])
def test_commands_run_where_they_should_with_the_gpus_they_get(label, argv, pod, container, role):
    args = parse_cli(label, argv)
    if role in ("rayjob", "submitted"):
        # On a Ray head under `ray job submit`: connect to that cluster, never start a local Ray, and
        # ask for GPUs a worker group has, on as many of its nodes as the run has workers.
        assert not args.no_ray and args.ray_address == "auto", f"{label}: use --ray-address auto"
        assert args.num_gpus and args.num_gpus >= 1, f"{label}: --num-gpus, or the run trains on CPU"
        workers = args.workers or 1
        for cluster in target_clusters(label, container):
            fits = [group["replicas"] for group in cluster["workerGroupSpecs"]
                    if all(gpus(c) >= args.num_gpus for c in group["template"]["spec"]["containers"])]
            assert fits, f"{label}: no worker has {args.num_gpus} GPUs"
            assert max(fits) >= workers, f"{label}: --workers {workers}, but at most {max(fits)} nodes have " \
                                         f"{args.num_gpus} GPUs (each worker needs a node of its own)"
            assert (args.min_workers or workers) <= workers
    else:
        # In a plain pod: the trainer is the process Kubernetes restarts.
        assert args.no_ray, f"{label}: a plain pod has no Ray cluster to join; use --no-ray"
        have = gpus(container)
        assert have >= 1 and (args.devices or have) <= have, f"{label}: --devices {args.devices}, {have} GPUs"


# -- preemption budgets -------------------------------------------------------------------------


def budget(container: dict) -> tuple[int, float]:
    env = literal_env(container)
    grace = env.get("CLUSTER_TRAINER_GRACE_SECONDS")
    assert grace is not None and grace.isdigit(), (
        f"{container['name']}: CLUSTER_TRAINER_GRACE_SECONDS must be a whole number of seconds "
        f"(it is also `ray drain-node --deadline-remaining-seconds`), got {grace!r}")
    return int(grace), float(env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", RAY_DRAIN_DEFAULT_SECONDS))


def pods_with_roles():
    for name, doc in documents():
        for role, pod in pod_specs(doc):
            yield where(name, doc), role, pod


def test_ray_workers_have_time_to_drain_and_flush():
    """terminationGracePeriodSeconds >= drain-node + flush budget + Ray's own drain + exit."""
    workers = [(label, pod) for label, role, pod in pods_with_roles() if role == "worker"]
    assert workers
    for label, pod in workers:
        (container,) = pod["containers"]
        grace, ray_drain = budget(container)
        need = PRESTOP_CONNECT_SECONDS + grace + ray_drain + EXIT_SECONDS
        have = pod.get("terminationGracePeriodSeconds", 30)
        assert have >= need, f"{label} worker: terminationGracePeriodSeconds {have} < {need} " \
                             f"({PRESTOP_CONNECT_SECONDS} + {grace} + {ray_drain:g} + {EXIT_SECONDS})"
        assert "preStop" in container.get("lifecycle", {}), f"{label} worker: no preStop hook to drain Ray"
        cloud = spot_cloud(pod)
        assert cloud, f"{label}: GPU workers belong on Spot nodes"
        if cloud == "gke":  # the kubelet gives the pods of a preempted Spot VM 15 s, whatever they ask
            assert grace <= GKE_SPOT_POD_SECONDS, f"{label}: a {grace} s flush budget on GKE Spot is fiction"
        if cloud == "eks":  # a pod drained a few seconds into the notice must be gone before the instance
            assert have <= AWS_SPOT_NOTICE_SECONDS - DRAIN_HANDLER_SECONDS, f"{label}: {have} s > the notice"


def test_ray_heads_have_time_for_rays_own_drain_and_stay_off_spot():
    heads = [(label, pod) for label, role, pod in pods_with_roles() if role == "head"]
    assert heads
    for label, pod in heads:
        (container,) = pod["containers"]
        ray_drain = float(literal_env(container).get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S",
                                                     RAY_DRAIN_DEFAULT_SECONDS))
        assert pod.get("terminationGracePeriodSeconds", 30) >= ray_drain + EXIT_SECONDS, label
        assert on_demand_only(pod), f"{label}: losing the head loses the cluster; keep it off Spot nodes"


def test_plain_trainer_pods_have_time_to_flush():
    plain = [(label, pod, container) for label, _, pod, container, role in TRAINER_COMMANDS if role == "job"]
    assert plain
    for label, pod, container in plain:
        grace, _ = budget(container)
        have = pod.get("terminationGracePeriodSeconds", 30)
        assert have >= grace + EXIT_SECONDS, f"{label}: terminationGracePeriodSeconds {have} < {grace} + {EXIT_SECONDS}"
        if spot_cloud(pod) == "gke":
            assert grace <= GKE_SPOT_POD_SECONDS, label
        if spot_cloud(pod) == "eks":
            assert have <= AWS_SPOT_NOTICE_SECONDS - DRAIN_HANDLER_SECONDS, label


def prestop_hooks() -> dict[str, list[str]]:
    """The preStop hook's script -> the worker groups that use it."""
    hooks: dict[str, list[str]] = {}
    for label, role, pod in pods_with_roles():
        hook = pod["containers"][0].get("lifecycle", {}).get("preStop")
        if role == "worker" and hook:  # a worker without one fails test_ray_workers_have_time_to_drain_and_flush
            command = hook["exec"]["command"]
            # The tests below run the script with bash; anything else is shown as it is, and fails there.
            script = command[2] if command[:2] == ["/bin/bash", "-c"] and len(command) == 3 else shlex.join(command)
            hooks.setdefault(script, []).append(label)
    return hooks


def test_every_worker_group_uses_the_same_prestop_hook():
    assert len(prestop_hooks()) == 1, "the preStop hooks differ: " + repr(list(prestop_hooks().values()))


HOOKS = [pytest.param(script, id=" + ".join(labels)) for script, labels in prestop_hooks().items()]


@pytest.mark.parametrize("script", HOOKS)
def test_prestop_hook_drains_this_node_with_flags_this_ray_accepts(tmp_path, script):
    """Run the hook with a fake `ray` that records its arguments, then parse them with Ray's own
    `ray drain-node` command: the reason is PREEMPTION and the deadline is the flush budget."""
    # The installed Ray, the one pyproject.toml pins, and the click it is built on.
    import click
    from ray.scripts.scripts import drain_node

    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "ray-args"
    (fake / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    (fake / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "CLUSTER_TRAINER_GRACE_SECONDS": "1",
           "HOSTNAME": "worker-abc", "RAY_ADDRESS": "cluster-trainer-head-svc.default.svc.cluster.local:6379"}
    subprocess.run(["/bin/bash", "-c", script], env=env, timeout=10, check=True)
    argv = record.read_text().splitlines()
    assert argv[0] == "drain-node", argv
    try:
        context = drain_node.make_context("drain-node", argv[1:])
    except click.ClickException as e:
        pytest.fail(f"Ray {drain_node.name} rejects {argv}: {e.format_message()}")
    assert context.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert context.params["deadline_remaining_seconds"] == 1
    assert context.params["node_id"] is None and context.params["address"] is None  # this node, via RAY_ADDRESS

    # Without RAY_ADDRESS, `ray drain-node` would start and drain a new local Ray: the hook refuses.
    record.unlink()
    env.pop("RAY_ADDRESS")
    refused = subprocess.run(["/bin/bash", "-c", script], env=env, timeout=10, capture_output=True, check=False)
    assert refused.returncode != 0 and b"RAY_ADDRESS" in refused.stderr
    assert not record.exists()


def raylet_running() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "raylet":
                return True
    return False


@pytest.mark.parametrize("script", HOOKS)
def test_prestop_hook_waits_for_the_raylet_at_most_the_flush_budget(tmp_path, script):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ray").write_text("#!/bin/sh\nexit 0\n")
    (fake / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "CLUSTER_TRAINER_GRACE_SECONDS": "2",
           "HOSTNAME": "worker-abc", "RAY_ADDRESS": "head:6379"}

    def hook_seconds() -> float:
        start = time.monotonic()
        subprocess.run(["/bin/bash", "-c", script], env=env, timeout=20, check=True)
        return time.monotonic() - start

    if not raylet_running():  # another Ray on this machine would look like this node's raylet
        assert hook_seconds() < 1.5, "no raylet: the node is drained, nothing to wait for"
    raylet = tmp_path / "raylet"  # a process the hook takes for the raylet: `sleep` under that name
    shutil.copy(shutil.which("sleep"), raylet)
    process = subprocess.Popen([str(raylet), "30"])
    try:
        assert 1.5 < hook_seconds() < 5, "a raylet that never exits: wait the 2 s budget, then let SIGTERM come"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


# -- Jobs and CronJobs --------------------------------------------------------------------------


def policy_actions(job: dict) -> tuple[str | None, dict[int, str]]:
    """(action on DisruptionTarget, {exit code: action}) of a Job's podFailurePolicy, first rule wins."""
    disruption, codes = None, {}
    for rule in job.get("podFailurePolicy", {}).get("rules", []):
        for condition in rule.get("onPodConditions", []):
            if condition["type"] == "DisruptionTarget" and condition.get("status", "True") == "True":
                disruption = disruption or rule["action"]
        exits = rule.get("onExitCodes")
        if exits and exits["operator"] == "In":
            for code in exits["values"]:
                codes.setdefault(code, rule["action"])
    return disruption, codes


@pytest.mark.parametrize("name, doc", docs_of("CronJob", "Job"), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_jobs_do_not_spend_their_backoff_limit_on_preemptions(name, doc):
    label = where(name, doc)
    for job in job_specs(doc):
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never", f"{label}: podFailurePolicy needs restartPolicy: Never"
        disruption, codes = policy_actions(job)
        assert disruption == "Ignore", f"{label}: a DisruptionTarget (eviction, preemption) must not count"
        (container,) = pod["containers"]
        for rule in job["podFailurePolicy"]["rules"]:
            if "onExitCodes" in rule:
                assert rule["onExitCodes"].get("containerName") == container["name"], rule
        if container.get("command") == ["cluster-trainer"]:
            assert codes.get(EXIT_PREEMPTED) == "Ignore", f"{label}: exit {EXIT_PREEMPTED} is 'resume me'"
            assert codes.get(EXIT_BAD_INPUT) == "FailJob", f"{label}: bad input fails the same way again"
        else:  # the submitter: it exits EXIT_FINAL when a retry cannot help
            assert codes.get(submit_once().EXIT_FINAL) == "FailJob", label
            assert submit_once().EXIT_RETRY not in codes, f"{label}: exit {submit_once().EXIT_RETRY} is retried"
            assert on_demand_only(pod), f"{label}: it follows a run for hours; Spot nodes would only churn it"


@pytest.mark.parametrize("name, doc", docs_of("CronJob"), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_each_schedule_is_one_run_with_one_id_and_one_storage_uri(name, doc):
    label = where(name, doc)
    assert doc["spec"]["concurrencyPolicy"] == "Forbid", f"{label}: two runs of one schedule at once"
    assert len(doc["metadata"]["name"]) <= 52, f"{label}: Job names are <cronjob>-<11 digits>, at most 63"
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == JOB_NAME_FIELD, \
        f"{label}: JOB_NAME from the pod's Job label"
    argv = container.get("command", []) + container.get("args", [])
    undefined = {ref for a in argv for ref in KUBELET_REF.findall(a)} - set(env)
    assert not undefined, f"{label}: the kubelet leaves $({undefined.pop()}) as it is: not in env"
    storage = [a for a in argv if a.startswith("--storage")]
    assert len(storage) == 1 and storage[0].endswith("/$(JOB_NAME)"), f"{label}: --storage per Job: {storage}"
    if "--" in argv:  # submitted to Ray: the submission id is the same Job name
        assert "--submission-id=$(JOB_NAME)" in argv[:argv.index("--")], f"{label}: {argv}"
    expanded = expand_kubelet_refs(storage[0], container, doc["metadata"]["name"])
    assert expanded.endswith(f"/{doc['metadata']['name']}-{SAMPLE_MINUTES}"), expanded


# -- identity ----------------------------------------------------------------------------------


def test_credentials_come_from_service_accounts_not_secrets():
    for path in manifest_files():
        text = path.read_text()
        for word in ("kind: Secret", "secretKeyRef", "secretRef", "AWS_SECRET_ACCESS_KEY",
                     "GOOGLE_APPLICATION_CREDENTIALS"):
            assert word not in text, f"{path.name}: {word}; use workload identity or IRSA"
    for label, role, pod in pods_with_roles():
        (container,) = pod["containers"]
        for name, value in literal_env(container).items():
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", name), f"{label}: {name}={value!r}"
        if role == "job" and container.get("command", [""])[0] == "python":
            assert pod.get("automountServiceAccountToken") is False, f"{label}: the submitter needs no identity"
        else:
            assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{label} {role}: reads and writes the run"
    # One service account per cloud, same name: GKE Workload Identity, EKS IRSA.
    identities = {name: sorted(doc["metadata"].get("annotations", {})) for name, doc in docs_of("ServiceAccount")}
    assert identities == {"serviceaccount-gke.yaml": ["iam.gke.io/gcp-service-account"],
                          "serviceaccount-eks.yaml": ["eks.amazonaws.com/role-arn"]}, identities
    assert {doc["metadata"]["name"] for _, doc in docs_of("ServiceAccount")} == {SERVICE_ACCOUNT}


def test_containers_run_as_a_non_root_user_without_privilege_escalation():
    for label, role, pod in pods_with_roles():
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == dockerfile_user(), \
            f"{label}: run as the image's user, who owns {INSTALL_DIR}"
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, \
                f"{label}: the base image gives its user sudo"


# -- the image ---------------------------------------------------------------------------------


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile(), re.MULTILINE))


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER (\S+)$", dockerfile(), re.MULTILINE)
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"the image must end as a numeric non-root user, not {users[-1]}"
    return int(uid), int(gid or 0)


def dockerfile_copies() -> list[tuple[list[str], str]]:
    copies = []
    for line in re.findall(r"^COPY (.+)$", dockerfile(), re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        copies.append((parts[:-1], parts[-1]))
    return copies


def images() -> list[tuple[str, str, dict]]:
    return [(label, role, c) for label, role, pod in pods_with_roles() for c in pod["containers"]]


def test_image_is_built_from_this_project_with_the_demo_extras():
    args = dockerfile_args()
    makefile = (ROOT / "Makefile").read_text()
    (demo_extras,) = re.findall(r"^DEMO_EXTRAS\s*:?=\s*(\S+)\s*$", makefile, re.MULTILINE)
    assert args["EXTRAS"] == demo_extras, f"Dockerfile EXTRAS {args['EXTRAS']} != Makefile DEMO_EXTRAS {demo_extras}"
    assert re.search(r'pip install --no-cache-dir "\.\[\$\{EXTRAS\}\]"', dockerfile()), "install .[${EXTRAS}]"

    ray = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if Requirement(d).name == "ray")
    assert ray.specifier.contains(args["RAY_VERSION"]), f"RAY_VERSION {args['RAY_VERSION']} vs pyproject {ray}"
    (base,) = re.findall(r"^FROM (\S+)$", dockerfile(), re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-py311-${FLAVOR}", base
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains("3.11")
    assert args["FLAVOR"] in ("cpu", "gpu")
    for _, doc in docs_of("RayCluster", "RayJob"):
        for spec in ray_cluster_specs(doc):
            assert spec["rayVersion"] == args["RAY_VERSION"], f"{doc['metadata']['name']}: rayVersion"


def test_image_holds_every_file_the_manifests_name():
    copies = dockerfile_copies()
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", dockerfile(), re.MULTILINE)
    assert workdir.rstrip("/") + "/" == INSTALL_DIR
    named = set()
    for path in manifest_files():
        named |= set(re.findall(re.escape(INSTALL_DIR) + r"[\w./-]+", path.read_text()))
    assert named, "the manifests name no file in the image"
    for full in sorted(named):
        relative = full[len(INSTALL_DIR):]
        assert (ROOT / relative).is_file(), f"{full}: {relative} is not in the repository"
        assert any(relative == dest or (dest.endswith("/") and relative.startswith(dest))
                   for _, dest in copies), f"{full}: no COPY puts it in the image"
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "**" in ignore, "Dockerfile.dockerignore: exclude everything, then allow what COPY needs"
    for sources, _ in copies:
        for source in sources:
            assert source in allowed, f"COPY {source}: excluded by k8s/Dockerfile.dockerignore"


def test_every_pod_uses_one_image_repository_and_this_version():
    version = pyproject()["project"]["version"]
    repositories = set()
    for label, role, container in images():
        repository, _, tag = container["image"].rpartition(":")
        repositories.add(repository)
        flavor = "gpu" if gpus(container) or role in ("head", "worker") else "cpu"
        # Ray refuses a node whose Ray or Python differ from the head's: one tag for a whole cluster.
        want = f"{version}-{flavor}"
        assert tag == want, f"{label} {container['name']}: {container['image']}; want the tag {want}"
    assert len(repositories) == 1, repositories


# -- k8s/submit_once.py ----------------------------------------------------------------------


@functools.cache
def submit_once():
    spec = importlib.util.spec_from_file_location("submit_once", K8S / "submit_once.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeRay:
    """The slice of ray.job_submission.JobSubmissionClient that submit_once.py uses."""

    def __init__(self, jobs=(), ends=()):
        self.jobs = {job.submission_id: job for job in jobs}
        self.ends = list(ends)  # how each new submission ends: (status, exit code, error type)
        self.submitted: list[tuple[str, str]] = []

    @staticmethod
    def job(submission_id, status, exit_code=None, error_type=None, then=None):
        return types.SimpleNamespace(submission_id=submission_id, status=status, driver_exit_code=exit_code,
                                     error_type=error_type, message=f"{status} ({exit_code})", then=then)

    def list_jobs(self):
        return [self.job(None, "SUCCEEDED")] + list(self.jobs.values())  # plus a driver job without an id

    def submit_job(self, *, entrypoint, submission_id):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.submitted.append((submission_id, entrypoint))
        self.jobs[submission_id] = self.job(submission_id, "PENDING", then=self.ends.pop(0))

    def get_job_info(self, submission_id):
        job = self.jobs[submission_id]
        if job.then:  # the job runs to its end while it is followed
            job.status, job.driver_exit_code, job.error_type = job.then
            job.then = None
        return job

    async def tail_job_logs(self, submission_id):
        yield f"logs of {submission_id}\n"


COMMAND = ["cluster-trainer", "run", "/opt/cluster-trainer/jobs/mlp.py", "--storage=gs://b/runs/n-1"]


def run_submit_once(fake, *extra):
    said = []
    code = submit_once().main(["--address=http://head:8265", "--submission-id=n-1", *extra, "--", *COMMAND],
                              client=fake, sleep=lambda s: None, echo=said.append)
    return code, said


def test_submit_once_submits_a_new_run_and_follows_it_to_success():
    fake = FakeRay(ends=[("SUCCEEDED", 0, None)])
    code, said = run_submit_once(fake)
    assert code == 0 and fake.submitted == [("n-1", shlex.join(COMMAND))], said


def test_a_retried_pod_attaches_to_the_running_run_instead_of_submitting_again():
    fake = FakeRay(jobs=[FakeRay.job("n-1", "RUNNING", then=("SUCCEEDED", 0, None))])
    code, said = run_submit_once(fake)
    assert code == 0 and fake.submitted == [], said
    assert "already RUNNING" in said[0]


def test_a_finished_run_is_not_run_again():
    fake = FakeRay(jobs=[FakeRay.job("n-1", "SUCCEEDED", 0)])
    assert run_submit_once(fake)[0] == 0 and fake.submitted == []


@pytest.mark.parametrize("exit_code, error_type", [(EXIT_PREEMPTED, "JOB_ENTRYPOINT_COMMAND_ERROR"),
                                                   (None, "JOB_SUPERVISOR_ACTOR_DIED")])
def test_a_preempted_or_lost_run_is_resumed_under_the_next_attempt_id(exit_code, error_type):
    fake = FakeRay(jobs=[FakeRay.job("n-1", "FAILED", exit_code, error_type)], ends=[("SUCCEEDED", 0, None)])
    code, said = run_submit_once(fake)
    assert code == 0 and fake.submitted == [("n-1-2", shlex.join(COMMAND))], said


def test_the_newest_attempt_is_the_one_followed():
    fake = FakeRay(jobs=[FakeRay.job("n-1", "FAILED", EXIT_PREEMPTED),
                         FakeRay.job("n-1-2", "RUNNING", then=("FAILED", EXIT_PREEMPTED, None))],
                   ends=[("SUCCEEDED", 0, None)])
    code, said = run_submit_once(fake)
    assert code == 0 and [s for s, _ in fake.submitted] == ["n-1-3"], said


@pytest.mark.parametrize("status, exit_code", [("FAILED", 1), ("FAILED", EXIT_BAD_INPUT), ("FAILED", 3),
                                               ("STOPPED", None)])
def test_a_run_that_failed_for_another_reason_or_was_stopped_fails_the_job(status, exit_code):
    fake = FakeRay(jobs=[FakeRay.job("n-1", status, exit_code)])
    code, said = run_submit_once(fake)
    assert code == submit_once().EXIT_FINAL and fake.submitted == [], said


def test_resubmissions_stop_at_max_attempts():
    fake = FakeRay(ends=[("FAILED", EXIT_PREEMPTED, None)] * 3)
    code, said = run_submit_once(fake, "--max-attempts=3")
    assert code == submit_once().EXIT_FINAL and [s for s, _ in fake.submitted] == ["n-1", "n-1-2", "n-1-3"]
    assert "attempt 3 of --max-attempts 3" in said[-1]


def test_an_unreachable_ray_head_is_left_to_the_backoff_limit():
    class Unreachable(FakeRay):
        def list_jobs(self):
            raise ConnectionError("http://head:8265: connection refused")

    code, said = run_submit_once(Unreachable())
    assert code == submit_once().EXIT_RETRY and "connection refused" in said[-1]


def test_submit_once_usage_errors_fail_the_job():
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        submit_once().main(["--address=http://head:8265", "--submission-id=n-1"], client=FakeRay())
    assert exit_info.value.code == submit_once().EXIT_FINAL
    assert submit_once().EXIT_PREEMPTED == EXIT_PREEMPTED


def test_the_cronjob_submits_a_command_the_cli_accepts():
    """The CronJob's own arguments, as the kubelet expands them, through submit_once.py to Ray."""
    ((name, doc),) = [(n, d) for n, d in docs_of("CronJob") if "--" in d["spec"]["jobTemplate"]["spec"]
                      ["template"]["spec"]["containers"][0]["args"]]
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    args = [expand_kubelet_refs(a, container, doc["metadata"]["name"]) for a in container["args"]]
    fake = FakeRay(ends=[("SUCCEEDED", 0, None)])
    assert submit_once().main(args, client=fake, sleep=lambda s: None, echo=lambda m: None) == 0
    ((submission_id, entrypoint),) = fake.submitted
    assert submission_id == f"{doc['metadata']['name']}-{SAMPLE_MINUTES}"
    parsed = parse_cli(where(name, doc), shlex.split(entrypoint))
    assert parsed.storage.endswith(f"/{submission_id}")


def test_fake_ray_client_matches_rays_job_client():
    """The fake above has the methods and fields submit_once.py uses, with Ray's names."""
    from ray.job_submission import JobDetails, JobSubmissionClient

    for method in ("list_jobs", "submit_job", "get_job_info", "tail_job_logs"):
        assert callable(getattr(JobSubmissionClient, method)), method
    fields = set(JobDetails.model_fields if hasattr(JobDetails, "model_fields") else JobDetails.__fields__)
    assert {"submission_id", "status", "driver_exit_code", "error_type", "message"} <= fields
    assert inspect.isasyncgenfunction(JobSubmissionClient.tail_job_logs)
    assert inspect.isasyncgenfunction(FakeRay.tail_job_logs)
