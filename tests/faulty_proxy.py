"""An HTTP proxy on loopback that breaks a seeded fraction of requests to an S3 server.

Faults: `503 SlowDown` answers, connections dropped without an answer, and
answers delayed past the client's read timeout. Everything else is forwarded
unchanged. Bounded by construction: it only ever talks to its upstream on
127.0.0.1, and stops with the test.
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import time
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    def __init__(self, upstream: str, *, fail_rate=0.0, drop_rate=0.0, delay_rate=0.0, delay_seconds=3.0,
                 latency_seconds=0.0, seed=0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rates = (fail_rate, drop_rate, delay_rate)
        self.delay_seconds = delay_seconds
        self.latency_seconds = latency_seconds
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = {"503": 0, "drop": 0, "delay": 0, "forwarded": 0}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    roll = proxy.random.random()
                fail, drop, delay = proxy.rates
                if proxy.latency_seconds:
                    time.sleep(proxy.latency_seconds)
                if roll < fail:
                    proxy._count("503")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if roll < fail + drop:
                    proxy._count("drop")
                    self.close_connection = True
                    self.connection.close()
                    return
                if roll < fail + drop + delay:
                    proxy._count("delay")
                    time.sleep(proxy.delay_seconds)
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()
                proxy._count("forwarded")

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _count(self, kind):
        with self.lock:
            self.injected[kind] += 1

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
