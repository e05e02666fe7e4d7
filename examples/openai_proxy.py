"""An OpenAI-compatible ``/v1/chat/completions`` proxy that meters every call.

    python examples/openai_proxy.py --listen 127.0.0.1:8080 --backend http://127.0.0.1:8000 \
        --meterd 127.0.0.1:50051

The caller's API key (``Authorization: Bearer <key>``) is its meterd customer
id. For each request the proxy:

1. reserves the prompt's tokens (estimated: 4 characters a token) on
   ``input_tokens`` and ``max_tokens`` on ``output_tokens``, at the model's
   prices, before anything is forwarded; if meterd refuses, it answers 429
   with error type ``insufficient_quota``, as OpenAI does;
2. forwards the request to the backend;
3. commits the real ``usage.prompt_tokens`` and ``usage.completion_tokens``
   from the backend's answer (a reservation is a ceiling, not the charge),
   or releases both reservations if the backend failed.

Streaming (``"stream": true``) is not handled by this example.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meterd.client import Denied, MeterClient

DEFAULT_MAX_TOKENS = 1024


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A deliberately generous estimate; the commit uses the backend's real count."""
    text = "".join(str(m.get("content", "")) for m in messages)
    return math.ceil(len(text) / 4) + 4 * len(messages)


class Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: str, meter: MeterClient) -> None:
        super().__init__(address, Handler)
        self.backend = backend.rstrip("/")
        self.meter = meter


class Handler(BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._answer(status, {"error": {"message": message, "type": kind, "param": None, "code": kind}})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/v1/chat/completions":
            return self._error(404, f"unknown path {self.path}", "invalid_request_error")
        key = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not key:
            return self._error(401, "an API key is required", "invalid_request_error")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            model, messages = str(body["model"]), list(body["messages"])
            max_tokens = int(body.get("max_tokens") or DEFAULT_MAX_TOKENS)
        except (ValueError, KeyError, TypeError):
            return self._error(400, "expected JSON with model, messages and an optional max_tokens",
                               "invalid_request_error")
        if body.get("stream"):
            return self._error(400, "streaming is not supported by this proxy", "invalid_request_error")
        meter = self.server.meter
        try:
            with meter.reserve(key, "input_tokens", estimate_prompt_tokens(messages), model=model) as prompt, \
                    meter.reserve(key, "output_tokens", max_tokens, model=model) as completion:
                answer = self._forward(body)  # an exception here releases both reservations
                usage = answer.get("usage") or {}
                prompt.actual = int(usage.get("prompt_tokens", 0))
                completion.actual = int(usage.get("completion_tokens", 0))
        except Denied as e:
            return self._error(429, f"You exceeded your current quota ({e}).", "insufficient_quota")
        except BackendError as e:
            return self._error(502, f"the model backend failed: {e}", "api_error")
        self._answer(200, answer)

    def _forward(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.server.backend + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except (urllib.error.URLError, ValueError, OSError) as e:
            raise BackendError(str(e)) from None


class BackendError(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--backend", required=True, help="base URL of an OpenAI-compatible model server")
    parser.add_argument("--meterd", default="127.0.0.1:50051", help="meterd's data plane")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with MeterClient(args.meterd) as meter:
        proxy = Proxy((host, int(port)), args.backend, meter)
        print(f"proxying http://{args.listen}/v1/chat/completions to {args.backend}", flush=True)
        try:
            proxy.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            proxy.server_close()


if __name__ == "__main__":
    main()
