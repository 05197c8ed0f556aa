"""A real local Ray cluster for tests: nodes on 127.0.0.1, every process stopped by PID.

Each node is one `ray start --block` process, started in a directory of its
own (also its `--temp-dir`) with a marker in its environment
(`CT_RAY_TEST_NODE=<random id>`). A node's processes are those that carry the
marker, or whose working directory is below the node's directory, or that
descend from its `ray start`: GCS, raylet, dashboard and its agents, log
monitor, workers, actors, and the entrypoints of `ray job submit`. Three ways,
because each alone misses some: Ray's processes rename themselves
(`ray::DashboardAgent`), which can overwrite the environment /proc shows, and a
process whose parent died is no longer anyone's descendant. Stopping a node
SIGKILLs exactly those PIDs. Nothing is found by name and `ray stop` is never
run: it would stop every Ray process on the machine, other people's too.

Every port a node opens is chosen free on 127.0.0.1 and passed explicitly,
because Ray's defaults (6379, 10001, 8265, 52365) collide with any other
cluster on the same machine.

Example:
    >>> with RayCluster() as cluster:                 # doctest: +SKIP
    ...     head = cluster.start_head(num_cpus=1)
    ...     worker = cluster.add_node(num_cpus=1)
    ...     worker.kill()                             # the machine is gone
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MARKER = "CT_RAY_TEST_NODE"
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(**extra: str) -> dict:
    """The environment Ray nodes (and their workers) run with.

    The current interpreter's bin directory comes first on PATH: a `ray job
    submit` entrypoint runs `cluster-trainer` from the PATH of `ray start`.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_TEST_", "RAY_ADDRESS"))}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        RAY_AUTH_MODE="disabled",  # Ray >= 2.59 turns token auth on for local clusters; local tests only
        RAY_USAGE_STATS_ENABLED="0",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.update(extra)
    return env


def _pids_with_marker(value: str) -> list[int]:
    """Processes whose environment (as /proc shows it) carries `CT_RAY_TEST_NODE=value`."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ:
            found.append(pid)
    return found


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pids_in(directory: Path) -> list[int]:
    """Processes whose working directory is `directory` or below (even once it is deleted)."""
    prefix = str(directory)
    found = []
    for pid in _all_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            found.append(pid)
    return found


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting to be reaped
    except OSError:
        return False


class RayNode:
    """One `ray start --block` and everything it spawned."""

    def __init__(self, process: subprocess.Popen, marker: str, directory: Path, log: Path, head: bool):
        self.process = process
        self.marker = marker
        self.directory = directory
        self.log = log
        self.head = head
        self.node_id: str | None = None

    def pids(self) -> list[int]:
        """PIDs of this node's processes (the `ray start` process and all it started), alive now."""
        pids = set(_pids_with_marker(self.marker)) | set(_pids_in(self.directory))
        if self.process.poll() is None:
            pids |= {self.process.pid, *_descendants(self.process.pid)}
        return sorted(p for p in pids if p != os.getpid() and _alive(p))

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL every process of this node, as if the machine vanished; wait until all are gone."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:  # raylet and workers alike: nobody gets to clean up
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of Ray node {self.node_id} survived SIGKILL: {pids}")
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.wait(timeout=10)

    def _wait_for_node_id(self) -> str:
        """The node id, from the raylet's command line (`--node_id=<hex>`)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            for pid in _pids_with_marker(self.marker):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv and argv[0].endswith(b"/raylet"):
                    for arg in argv:
                        if arg.startswith(b"--node_id="):
                            return arg.split(b"=", 1)[1].decode()
            time.sleep(0.2)
        raise RuntimeError(f"no raylet appeared in {START_TIMEOUT}s:\n{self.log.read_text()[-3000:]}")


class RayCluster:
    """A head and any number of worker nodes on 127.0.0.1, in a private temp dir.

    `address` is the GCS address (`ray.init`, `--ray-address`, `ray drain-node`);
    `dashboard` the HTTP address `ray job submit` talks to.
    """

    def __init__(self, **env: str):
        # Short: Ray puts Unix sockets below it, and socket paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ctray-", dir="/tmp"))
        self.env = cluster_env(**env)
        self.nodes: list[RayNode] = []
        self.address: str | None = None
        self.dashboard: str | None = None

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, args: list[str], head: bool, num_cpus: int, resources: dict | None, env: dict | None) -> RayNode:
        marker = uuid.uuid4().hex
        index = len(self.nodes)
        directory = self.root / f"n{index}"
        directory.mkdir()
        log = self.root / f"ray-start-{index}.log"
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--block", *args, *ports,
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}", "--disable-usage-stats",
            "--object-store-memory=100000000",  # 100 MB each: the tests move nothing big
            # A temp dir per node, as on separate machines: nodes sharing one would each forward
            # every worker's output to the driver, so each line would arrive twice.
            f"--temp-dir={directory}",
        ]
        with open(log, "w") as sink:
            process = subprocess.Popen(command, env={**self.env, **(env or {}), MARKER: marker}, stdout=sink,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory)
        node = RayNode(process, marker, directory, log, head)
        self.nodes.append(node)
        node.node_id = node._wait_for_node_id()
        return node

    def start_head(self, num_cpus: int = 1, resources: dict | None = None, env: dict | None = None,
                   dashboard: bool = True) -> RayNode:
        """The head node (GCS, and the dashboard `ray job submit` talks to unless `dashboard=False`: it is
        a handful of Python processes that cost CPU seconds to start and keep polling); `env` adds to its
        processes' environment."""
        port = free_port()
        dashboard_port = free_port()
        shown = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        node = self._start(
            ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
             *(shown if dashboard else ["--include-dashboard=false"])],
            head=True, num_cpus=num_cpus, resources=resources, env=env,
        )
        self.address = f"127.0.0.1:{port}"
        self._wait_for_nodes(1)
        if dashboard:
            self.dashboard = f"http://127.0.0.1:{dashboard_port}"
            self._wait_for_dashboard()
        return node

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, env: dict | None = None) -> RayNode:
        """A worker node (a second raylet); `env` adds to its processes' environment (its actors')."""
        assert self.address, "start the head first"
        node = self._start([f"--address={self.address}"], head=False, num_cpus=num_cpus, resources=resources, env=env)
        self._wait_for_nodes(sum(1 for n in self.nodes if n.process.poll() is None))
        return node

    def ray(self, *args: str, timeout: float = 300, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        """Run the `ray` CLI of this interpreter with the cluster's environment."""
        return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=cwd or self.root)

    def drain(self, node: RayNode, deadline_seconds: int, message: str = "test preemption") -> None:
        """Drain `node` with reason PREEMPTION, as a cloud's spot reclaim does through Ray."""
        result = self.ray("drain-node", f"--address={self.address}", f"--node-id={node.node_id}",
                          "--reason=DRAIN_NODE_REASON_PREEMPTION", f"--reason-message={message}",
                          f"--deadline-remaining-seconds={deadline_seconds}")
        if result.returncode != 0:
            raise RuntimeError(f"ray drain-node failed: {result.stdout}{result.stderr}")

    def hold(self, node: RayNode, num_cpus: float) -> "Hold":
        """Occupy `num_cpus` of `node` with an idle actor until `release()`, so Ray places nothing else there."""
        return Hold(self, node, num_cpus)

    def _wait_for_nodes(self, count: int) -> None:
        """Until the GCS lists `count` alive nodes (a raylet is up before it has registered)."""
        script = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                  "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            result = subprocess.run([sys.executable, "-c", script, self.address], env=self.env,
                                    capture_output=True, text=True, timeout=120)
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1] == str(count):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} nodes: {result.stdout}{result.stderr}")
            time.sleep(0.5)

    def _wait_for_dashboard(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 under token auth): it is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard at {self.dashboard} did not come up in {START_TIMEOUT}s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Kill every process of every node, workers first (then nothing is restarted), by PID."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.kill()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]


_HOLD_SCRIPT = """
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote
class Holder:
    def ready(self):
        return True

holder = Holder.options(num_cpus=float(sys.argv[3]),
                        scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(holder.ready.remote())
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin; exiting ends this job, and Ray kills its actor
"""


class Hold:
    """An actor pinned to a node, owned by a small driver process of its own (see `RayCluster.hold`)."""

    def __init__(self, cluster: RayCluster, node: RayNode, num_cpus: float):
        self.cluster = cluster
        self.process = subprocess.Popen([sys.executable, "-c", _HOLD_SCRIPT, cluster.address, node.node_id, str(num_cpus)],
                                        env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "held":
            self.release()
            raise RuntimeError(f"could not hold node {node.node_id}: {line}{self.process.stdout.read()[-2000:]}")

    def release(self) -> None:
        """Let the holder's driver exit; Ray then kills the actor and frees the CPUs."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
