"""An EC2 instance metadata server (IMDSv2) on 127.0.0.1 that recommends a rebalance when told to.

For the cadence benchmark's early warnings: a training process started with
`--notice aws` and `AWS_EC2_METADATA_SERVICE_ENDPOINT=<url>` polls it as it
would poll a spot instance's. It answers a session token, 404 on
`spot/instance-action` (no interruption notice: the benchmark kills the
process itself), and `{"noticeTime": ...}` on
`events/recommendations/rebalance` once `recommend()` was called.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

TOKEN = "bench-imds-token"


class RebalanceServer:
    def __init__(self):
        self.notice_time: str | None = None
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
                self._answer(200, TOKEN) if self.path == "/latest/api/token" else self._answer(400)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self._answer(401)
                if self.path == "/latest/meta-data/events/recommendations/rebalance" and server.notice_time:
                    return self._answer(200, json.dumps({"noticeTime": server.notice_time}))
                self._answer(404, "Not Found")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def recommend(self) -> None:
        self.notice_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def clear(self) -> None:
        """A new instance: no recommendation yet."""
        self.notice_time = None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
