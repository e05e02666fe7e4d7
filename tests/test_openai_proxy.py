"""examples/openai_proxy.py between a client and a fake model backend, metering
through a real daemon: the real token counts are charged, a refusal is a 429
insufficient_quota, and a failed backend leaves nothing reserved or charged."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meterd.client import MeterClient
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "openai_proxy.py"


class FakeModel(BaseHTTPRequestHandler):
    fail = False

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FakeModel.fail:
            self.send_response(500)
            self.end_headers()
            return
        answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def _serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def stack(make_daemon):
    d = make_daemon().start()
    d.admin.Grant(apb.GrantRequest(customer_id="sk-acme", credit_type="usd", amount_nano=10**9))
    d.admin.Grant(apb.GrantRequest(customer_id="sk-poor", credit_type="usd", amount_nano=100_000))
    spec = importlib.util.spec_from_file_location("openai_proxy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
    meter = MeterClient(d.target)
    proxy = module.Proxy(("127.0.0.1", 0), _serve(backend), meter)
    url = _serve(proxy) + "/v1/chat/completions"
    FakeModel.fail = False
    yield d, url
    proxy.shutdown()
    backend.shutdown()
    meter.close()


def _post(url: str, key: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _usd(d, customer: str) -> pb.CreditBalance:
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return next(b for b in r.balances if b.credit_type == "usd")


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello in one word."}], "max_tokens": 100}


def test_the_real_token_counts_are_charged(stack):
    d, url = stack
    status, answer = _post(url, "sk-acme", CHAT)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "hello"
    # 12 input tokens at $2.50 and 34 output tokens at $10.00 per million: 30,000 + 340,000 nano-dollars
    usd = _usd(d, "sk-acme")
    assert (usd.balance_nano, usd.reserved_nano) == (10**9 - 370_000, 0)


def test_a_refusal_is_429_insufficient_quota_and_nothing_is_forwarded(stack):
    d, url = stack
    status, answer = _post(url, "sk-poor", {**CHAT, "max_tokens": 1000})  # $0.01 of output > $0.0001 left
    assert status == 429 and answer["error"]["type"] == "insufficient_quota"
    usd = _usd(d, "sk-poor")
    assert (usd.balance_nano, usd.reserved_nano) == (100_000, 0)  # the prompt's reservation was released
    assert _post(url, "sk-nobody", CHAT)[0] == 429


def test_a_failed_backend_releases_the_reservations(stack):
    d, url = stack
    FakeModel.fail = True
    status, answer = _post(url, "sk-acme", CHAT)
    assert status == 502 and answer["error"]["type"] == "api_error"
    usd = _usd(d, "sk-acme")
    assert (usd.balance_nano, usd.reserved_nano) == (10**9, 0)


def test_bad_requests_are_refused_before_metering(stack):
    d, url = stack
    assert _post(url, "sk-acme", {"messages": []})[0] == 400
    assert _post(url, "", CHAT)[0] == 401
    assert _post(url, "sk-acme", {**CHAT, "stream": True})[0] == 400
    assert _usd(d, "sk-acme").balance_nano == 10**9
