"""Real object stores on loopback, started by the tests: moto's S3 server and a GCS emulator.

Processes reach them through the clouds' standard variables
(`AWS_ENDPOINT_URL_S3`, `STORAGE_EMULATOR_HOST`) and fsspec's
`FSSPEC_GCS_TOKEN=anon`, set in this process's environment so that the CLI
subprocesses inherit them. Each pytest worker starts its own pair.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

BUCKET = "cluster-trainer-tests"
# moto's server logs every request at INFO; pytest would keep thousands of lines per test.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ.update(
            {
                "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                # Never ask a cloud metadata endpoint for credentials: tests talk to loopback only.
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)

    def uri(self) -> str:
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def stop(self):
        self.server.stop()


class GCSServer:
    def __init__(self):
        from gcp_storage_emulator.server import create_server

        port = _free_port()
        self.server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({"STORAGE_EMULATOR_HOST": self.endpoint, "FSSPEC_GCS_TOKEN": "anon", "NO_GCE_CHECK": "True"})

    def uri(self) -> str:
        return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def stop(self):
        self.server.stop()
