"""A tiny OpenAI-compatible server for the coserve tests (standard library only, so it starts in a blink):

    python tests/fake_openai_server.py --port P [--slow-offline] [--record FILE.jsonl]

GET /health, GET /v1/models (one model, "fake-model") and streaming POST /v1/completions: one "tok "
chunk per max_tokens after small sleeps, then a usage chunk (prompt tokens = words of the prompt) and
[DONE]. Offline requests (service_tier flex, or a priority above 0 as vLLM's priority policy gets them)
are 20x slower per token with --slow-offline. --record appends every request body as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: every response ends by closing the connection, so a stream needs no chunked encoding
        def log_message(self, format: str, *a: object) -> None:
            pass

        def _json(self, obj: dict, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json({"status": "ok"})
            elif self.path == "/v1/models":
                self._json({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            else:
                self._json({"error": {"message": "not found"}}, 404)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if args.record:
                with lock, open(args.record, "a") as f:
                    f.write(json.dumps(body) + "\n")
            if self.path != "/v1/completions":
                self._json({"error": {"message": "not found"}}, 404)
                return
            offline = body.get("service_tier") == "flex" or body.get("priority", 0) > 0
            step = args.token_ms / 1e3 * (20 if offline and args.slow_offline else 1)
            n = int(body["max_tokens"])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                time.sleep(args.first_token_ms / 1e3)
                for i in range(n):
                    if i:
                        time.sleep(step)
                    self._event({"choices": [{"index": 0, "text": "tok "}]})
                usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
                self._event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client cancelled it (offline requests at the end of a run)

        def _event(self, obj: dict) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # many offline streams connect at once


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--slow-offline", action="store_true")
    ap.add_argument("--first-token-ms", type=float, default=20.0)
    ap.add_argument("--token-ms", type=float, default=2.0)
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    server = Server(("127.0.0.1", args.port), make_handler(args))
    print(f"fake server on port {args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
