"""The stores a benchmark writes to: local disk, moto's S3 server and the GCS emulator, on 127.0.0.1.

The servers run as separate processes, like a real remote store: in the
benchmark's process they would compete with the code being measured for the
GIL. Their endpoints go into this process's environment, so training
processes started by a benchmark (`bench.procs.child_env`) reach them too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

NAMES = {"local": "local disk", "s3": "S3 (moto server)", "gcs": "GCS (emulator)"}
_QUIET = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"store server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"store server did not listen on {port} within {timeout}s")


def start_s3(servers: list, bucket: str) -> str:
    """Start moto's S3 server, create `bucket`; returns `s3://bucket`."""
    port = _free_port()
    servers.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], **_QUIET))
    _wait_for_port(port, servers[-1])
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    import s3fs

    # fsspec caches filesystems by their arguments, and the endpoint comes from the environment:
    # drop any instance still pointing at an earlier server (another benchmark of the same run).
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"


def start_gcs(servers: list, bucket: str) -> str:
    """Start the GCS emulator (in memory) with `bucket`; returns `gs://bucket`."""
    port = _free_port()
    servers.append(subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator"), "start",
                                     "-H", "127.0.0.1", "--port", str(port), "--in-memory",
                                     "--default-bucket", bucket, "-q"], **_QUIET))
    _wait_for_port(port, servers[-1])
    os.environ.update({"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GCS_TOKEN": "anon",
                       "NO_GCE_CHECK": "True"})
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    return f"gs://{bucket}"


def start_stores(names: list[str], local_dir: str, servers: list, bucket: str) -> dict[str, str]:
    """Base URIs of the stores named ("local", "s3", "gcs"), by display name; servers are appended to `servers`."""
    stores = {}
    for name in names:
        if name == "local":
            stores[NAMES[name]] = local_dir
        elif name == "s3":
            stores[NAMES[name]] = start_s3(servers, bucket)
        elif name == "gcs":
            stores[NAMES[name]] = start_gcs(servers, bucket)
    return stores


def stop_servers(servers: list) -> None:
    for server in servers:
        server.terminate()
        server.wait()
