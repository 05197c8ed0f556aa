"""A cloud metadata server on 127.0.0.1 that answers like GCE's and EC2's (IMDSv2).

The tests (tests/test_notices.py) and the cadence benchmark poll it as a
training process started with `--notice gce|aws` polls a spot instance's:
point `GCE_METADATA_HOST` at `server.host` or
`AWS_EC2_METADATA_SERVICE_ENDPOINT` at `server.url`.

- GCE: `instance/preempted` answers TRUE once `preempt()` was called;
  `instance/maintenance-event` answers `server.maintenance`. Both need the
  `Metadata-Flavor: Google` header, as the real server does.
- EC2: a session token first (`PUT /latest/api/token`); then
  `spot/instance-action` is 404 until `preempt()`, then a termination
  `aws_seconds_left` from now; `events/recommendations/rebalance` is 404
  until `recommend()`, then `{"noticeTime": ...}`.

Every request is recorded in `server.requests` ("GET /path").
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from datetime import datetime, timedelta, timezone


class MetadataServer:
    """Answers like the GCE metadata server and EC2's IMDSv2; `preempt()` raises the notice.

    Example:
        >>> server = MetadataServer()
        >>> server.url.startswith("http://127.0.0.1:")
        True
        >>> server.stop()
    """

    TOKEN = "imds-session-token"

    def __init__(self, aws_seconds_left: float = 120.0):
        self.preempted = False
        self.aws_seconds_left = aws_seconds_left
        self.rebalance: str | None = None  # EC2's noticeTime, once it recommends a rebalance
        self.maintenance = "NONE"  # GCE's maintenance-event
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                server.requests.append(f"PUT {self.path}")
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(200, MetadataServer.TOKEN)
                self._answer(400)

            def do_GET(self):
                server.requests.append(f"GET {self.path}")
                if self.path.startswith("/computeMetadata/v1/instance/"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._answer(403, "Missing Metadata-Flavor:Google header.")
                    field = self.path.rsplit("/", 1)[1]
                    if field == "preempted":
                        return self._answer(200, "TRUE" if server.preempted else "FALSE")
                    if field == "maintenance-event":
                        return self._answer(200, server.maintenance)
                elif self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != MetadataServer.TOKEN:
                        return self._answer(401)
                    if not server.preempted:
                        return self._answer(404, "Not Found")
                    when = datetime.now(timezone.utc) + timedelta(seconds=server.aws_seconds_left)
                    return self._answer(200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))
                elif self.path == "/latest/meta-data/events/recommendations/rebalance":
                    if self.headers.get("X-aws-ec2-metadata-token") != MetadataServer.TOKEN:
                        return self._answer(401)
                    if server.rebalance is None:
                        return self._answer(404, "Not Found")
                    return self._answer(200, json.dumps({"noticeTime": server.rebalance}))
                self._answer(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def preempt(self) -> None:
        self.preempted = True

    def recommend(self) -> None:
        """EC2 recommends a rebalance (an early warning, not an interruption)."""
        self.rebalance = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def clear(self) -> None:
        """A new instance: no notice and no recommendation yet."""
        self.preempted, self.rebalance, self.maintenance = False, None, "NONE"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
