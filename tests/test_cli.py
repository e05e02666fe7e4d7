"""The operator's CLI against a real daemon: grant, bulk grants from CSV with a
progress bar, adjust, balance, and the help texts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from meterd.progress import Progress
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

pytestmark = pytest.mark.spawns  # meterd commands
COMMANDS = ["serve", "check-config", "balance", "report", "grant", "adjust", "overdraft", "terms", "subscribe",
            "cancel", "change-plan", "audit", "advance-clock",
            "statement", "usage", "bench", "ledger migrate", "ledger check", "ledger release-sidecar",
            "ledger allowance"]


def meterd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meterd", *args], capture_output=True, text=True, timeout=timeout)


def _usd(d, customer: str) -> int:
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return next(b.balance_nano for b in r.balances if b.credit_type == "usd")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself_with_examples(command):
    import argparse

    from meterd.cli import build_parser
    r = meterd(*command.split(), "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "meterd " + command in r.stdout
    parser = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    for action in parser._actions:
        assert action.help, f"meterd {command}: {action.option_strings or action.dest} has no help text"


def test_grant_adjust_and_balance(make_daemon):
    d = make_daemon().start()
    data_dir = str(d.data_dir)
    r = meterd("grant", "--data-dir", data_dir, "--customer", "acme", "--credit-type", "usd", "--amount", "25.00",
               "--idempotency-key", "k1", "--new-customer")
    assert r.returncode == 0 and "balance 25" in r.stdout, r.stderr
    again = meterd("grant", "--data-dir", data_dir, "--customer", "acme", "--credit-type", "usd", "--amount",
                   "25.00", "--idempotency-key", "k1")
    assert "(duplicate)" in again.stdout
    r = meterd("adjust", "--data-dir", data_dir, "--customer", "acme", "--credit-type", "usd", "--amount", "-3.50",
               "--reason", "double-billed job 77")
    assert r.returncode == 0 and "adjusted by -3.5: balance 21.5" in r.stdout, r.stderr
    assert _usd(d, "acme") == 21_500_000_000
    entry = d.admin.ListAudit(apb.ListAuditRequest(customer_id="acme", limit=10)).entries[-1]
    assert (entry.kind, entry.reference) == ("adjust", "double-billed job 77")
    r = meterd("balance", "--customer", "acme", "--target", d.target)
    assert r.returncode == 0 and "usd" in r.stdout and "21.5" in r.stdout
    r = meterd("adjust", "--data-dir", data_dir, "--customer", "acme", "--credit-type", "usd", "--amount", "1.2.3",
               "--reason", "x")
    assert r.returncode == 2 and "--amount" in r.stderr
    r = meterd("grant", "--data-dir", data_dir, "--customer", "acme")
    assert r.returncode == 2 and "--from-csv" in r.stderr


def test_report_sends_one_event_of_one_meter_or_of_a_requests_quantities(make_daemon):
    d = make_daemon().start()  # the built-in demo catalog: demo holds $10.00
    r = meterd("report", "--customer", "demo", "input_tokens=1200", "--dimension", "model=gpt-4o",
               "--target", d.target)
    assert r.returncode == 0 and r.stdout.strip() == "DECISION_ALLOW cost 0.003 usd, balance 9.997", r.stderr
    # one call: $0.0025 of input, $0.001 of cached input and $0.0035 of output, decided as a whole
    r = meterd("report", "--customer", "demo", "input_tokens=1000", "cached_input_tokens=800",
               "output_tokens=350", "--dimension", "model=gpt-4o", "--target", d.target, "--idempotency-key", "c1")
    assert r.returncode == 0 and r.stdout.strip() == "DECISION_ALLOW cost 0.007 usd, balance 9.99", r.stderr
    again = meterd("report", "--customer", "demo", "output_tokens=350", "input_tokens=1000",
                   "cached_input_tokens=800", "--dimension", "model=gpt-4o", "--target", d.target,
                   "--idempotency-key", "c1")
    assert again.stdout.strip().endswith("(a repeat: nothing charged again)"), again.stdout
    assert _usd(d, "demo") == 9_990_000_000
    r = meterd("report", "--customer", "demo", "output_tokens=20000000", "--dimension", "model=gpt-4o",
               "--target", d.target)
    assert r.returncode == 0 and "DECISION_DENY" in r.stdout and "REASON_INSUFFICIENT_BALANCE" in r.stdout
    r = meterd("report", "--customer", "demo", "input_tokens=1", "requests=1", "--dimension", "model=gpt-4o",
               "--target", d.target)
    assert r.returncode == 1 and "INVALID_ARGUMENT: event.quantities[1].meter: meter 'requests' prices in " \
                                 "credit type" in r.stderr, r.stderr
    r = meterd("report", "--customer", "demo", "input_tokens", "--target", d.target)
    assert r.returncode == 2 and "METER=QUANTITY: 'input_tokens' is not KEY=VALUE" in r.stderr, r.stderr


def test_overdraft_sets_and_clears_a_customers_own(make_daemon):
    d = make_daemon().start()  # the built-in demo catalog: demo holds $10.00
    data_dir = ["--data-dir", str(d.data_dir)]
    r = meterd("overdraft", *data_dir, "--customer", "demo", "--credit-type", "usd", "--amount", "2.50",
               "--reason", "net-30 terms")
    assert r.returncode == 0 and r.stdout.strip() == ("overdraft of demo in usd set to 2.5: the balance may go down "
                                                      "to -2.5; available 12.5"), (r.stdout, r.stderr)
    r = meterd("overdraft", *data_dir, "--customer", "demo", "--credit-type", "usd", "--clear", "--reason", "ended")
    assert r.returncode == 0 and "cleared: the balance may go down to 0; available 10" in r.stdout, r.stderr
    r = meterd("overdraft", *data_dir, "--customer", "demo", "--credit-type", "usd", "--reason", "x")
    assert r.returncode == 2 and "--amount: give the overdraft, or --clear" in r.stderr, r.stderr
    r = meterd("overdraft", *data_dir, "--customer", "ghost", "--credit-type", "usd", "--amount", "1",
               "--reason", "x")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr, r.stderr
    kinds = [e.kind for e in d.admin.ListAudit(apb.ListAuditRequest(customer_id="demo", limit=10)).entries]
    assert kinds.count("overdraft") == 2


def test_terms_set_list_and_clear_a_customers_discount(make_daemon):
    d = make_daemon().start()  # the built-in demo catalog: demo holds $10.00
    data_dir = ["--data-dir", str(d.data_dir)]
    r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--discount", "12.5%",
               "--reason", "annual contract")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["discount of demo in usd set to 12.5%: the balance may go down to 0; "
                                     "available 10", "  usd                  discount   12.5%"], r.stdout
    r = meterd("terms", "--customer", "demo", "--target", d.target)  # listed from GetBalance
    assert r.returncode == 0 and r.stdout.split() == ["usd", "discount", "12.5%"], (r.stdout, r.stderr)
    r = meterd("balance", "--customer", "demo", "--target", d.target)
    assert "term  usd                  discount   12.5%" in r.stdout, r.stdout
    for bad, words in [("12.345", "--discount: '12.345' must be a percentage from 0 to 100 with at most 2 decimals"),
                       ("101", "must be a percentage"), ("-5", "must be a percentage"),
                       ("1e2", "must be a percentage")]:
        r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--discount", bad,
                   "--reason", "x")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--budget", "five", "--reason", "x")
    assert r.returncode == 2 and r.stderr.startswith("meterd: --budget:") and "Traceback" not in r.stderr, r.stderr
    r = meterd("terms", *data_dir, "--customer", "demo", "--discount", "5", "--reason", "x")
    assert r.returncode == 2 and "--credit-type and --reason are needed" in r.stderr, r.stderr
    r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--budget", "5", "--reason", "x")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "credit_type" in r.stderr, r.stderr
    r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--discount", "5", "--clear",
               "discount", "--reason", "x")
    assert r.returncode == 2 and "one of --discount, --budget, --included or --clear at a time" in r.stderr
    r = meterd("terms", *data_dir, "--customer", "demo", "--credit-type", "usd", "--clear", "discount",
               "--reason", "contract ended")
    assert r.returncode == 0 and "discount of demo in usd cleared" in r.stdout, r.stderr
    r = meterd("terms", "--customer", "demo", "--target", d.target)
    assert "demo has no terms of its own" in r.stdout, r.stdout
    kinds = [e.kind for e in d.admin.ListAudit(apb.ListAuditRequest(customer_id="demo", limit=10)).entries]
    assert kinds.count("discount") == 2


def test_bulk_grants_from_csv_once_each_with_progress(make_daemon, tmp_path):
    d = make_daemon().start()
    rows = (["customer,credit_type,amount"] + [f"c{i},usd,1.25" for i in range(300)]
            + ["# a comment", "vip,usd,100,vip-1"])
    csv_file = tmp_path / "topups.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    args = ("grant", "--data-dir", str(d.data_dir), "--from-csv", str(csv_file), "--new-customer")
    r = meterd(*args)
    assert r.returncode == 0, r.stderr
    assert "granted 301 rows" in r.stdout
    progress = [line for line in r.stderr.splitlines() if line.startswith("granting [")]
    assert progress[-1].startswith("granting [" + "#" * 30 + "] 100% 301/301")  # not a terminal: a line per tenth
    assert 5 <= len(progress) <= 11
    r = meterd(*args)  # the same file again grants nothing twice
    assert r.returncode == 0 and "granted 0 rows" in r.stdout and "301 already granted" in r.stdout
    assert _usd(d, "c7") == 1_250_000_000 and _usd(d, "vip") == 100 * 10**9
    bad = tmp_path / "bad.csv"
    bad.write_text("a,usd,1\nb,usd\n")
    r = meterd("grant", "--data-dir", str(d.data_dir), "--from-csv", str(bad))
    assert r.returncode == 2 and f"{bad}:2: expected customer,credit_type,amount" in r.stderr
    with pytest.raises(grpc.RpcError) as e:  # every row is checked before the first grant
        d.meter.GetBalance(pb.GetBalanceRequest(customer_id="a"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    p = Progress(4, "copying", stream=out, width=8)
    for _ in range(4):
        p.advance()
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n")
    assert "copying [########] 100% 4/4" in text and "copying [####....]  50% 2/4" in text


def test_ledger_reads_never_create_and_bad_input_is_named_without_a_traceback(tmp_path):
    missing = tmp_path / "ledgr.sqlite3"  # a mistyped path
    for command in (("usage", "--from", "2026-11-01", "--to", "2026-12-01"), ("statement", "--period", "2026-11")):
        r = meterd(*command, "--customer", "c1", "--ledger", f"sqlite:///{missing}")
        assert (r.returncode, r.stderr.strip()) == (1, f"meterd: no ledger at {missing}: the file does not exist "
                                                       "(reading never creates one; check --ledger)")
        assert not missing.exists()
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database\n" * 100)
    r = meterd("statement", "--customer", "c1", "--period", "2026-11", "--ledger", f"sqlite:///{not_a_db}")
    assert r.returncode == 1 and r.stderr.startswith(f"meterd: the ledger {not_a_db} is not a SQLite database"), \
        r.stderr
    assert not_a_db.read_text() == "not a database\n" * 100 and "Traceback" not in r.stderr
    other = tmp_path / "other.sqlite3"  # a database, but not a ledger: read, not migrated
    import sqlite3
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    r = meterd("usage", "--customer", "c1", "--from", "2026-11-01", "--to", "2026-12-01", "--ledger",
               f"sqlite:///{other}")
    assert r.returncode == 1 and "holds no meterd tables" in r.stderr, r.stderr
    with sqlite3.connect(other) as conn:
        assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master")] == ["t"]
    assert meterd("ledger", "migrate", "--ledger", f"sqlite:///{missing}").returncode == 0  # migrate creates
    r = meterd("statement", "--customer", "c1", "--period", "9999-12", "--ledger", f"sqlite:///{missing}")
    assert (r.returncode, r.stderr.strip()) == (2, "meterd: --period: '9999-12' is out of range: a month from "
                                                   "1970-01 to 9998-12")
    r = meterd("statement", "--customer", "c1", "--period", "9998-12", "--ledger", f"sqlite:///{missing}")
    assert r.returncode == 0 and "Nothing is owed" in r.stdout, r.stderr
    r = meterd("usage", "--customer", "c1", "--from", "0000000000", "--to", "9" * 20, "--ledger",
               f"sqlite:///{missing}")
    assert r.returncode == 2 and "--to" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_check_config_refuses_a_sidecar_id_the_data_directory_was_not_made_under(make_daemon):
    d = make_daemon(extra_env={"METERD_SIDECAR_ID": "sidecar-a"}).start()
    d.stop()
    import os
    env = {**os.environ, "METERD_SIDECAR_ID": "sidecar-b"}
    for command in ("check-config", "serve"):
        r = subprocess.run([sys.executable, "-m", "meterd", command, "--data-dir", str(d.data_dir), "--listen",
                            "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "sidecar_id 'sidecar-b' differs from 'sidecar-a'" in r.stderr, (command, r)


@pytest.mark.parametrize("listen, message", [
    ("127.0.0.1:99999", "listen: '127.0.0.1:99999': the port must be 0 to 65535"),
    ("unix:/nonexistent-dir/meter.sock", "listen: cannot listen on unix:/nonexistent-dir/meter.sock"),
])
def test_an_address_that_cannot_be_listened_on_is_refused(tmp_path, listen, message):
    for command in ("check-config", "serve"):
        r = meterd(command, "--data-dir", str(tmp_path / "data"), "--listen", listen)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)


def test_a_grant_is_positive_and_creates_a_customer_only_when_told(make_daemon, tmp_path):
    d = make_daemon().start()
    grant = ("grant", "--data-dir", str(d.data_dir), "--credit-type", "usd")
    for amount in ("-1", "0", "0.00"):
        r = meterd(*grant, "--customer", "demo", "--amount", amount)
        assert (r.returncode, r.stderr.strip()) == (2, f"meterd: --amount: '{amount}' must be positive; use "
                                                       "`meterd adjust` (with --reason) to take credits away")
    r = meterd(*grant, "--customer", "demoo", "--amount", "5")  # a typo of demo
    assert (r.returncode, r.stderr.strip()) == (2, "meterd: --customer: customer 'demoo' is not in the catalog and "
                                                   "has no account: check the id, or pass --new-customer to create "
                                                   "it with this grant")
    with pytest.raises(grpc.RpcError) as e:
        d.meter.GetBalance(pb.GetBalanceRequest(customer_id="demoo"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was made
    assert meterd(*grant, "--customer", "demo", "--amount", "5").returncode == 0  # the catalog's customer
    r = meterd(*grant, "--customer", "newco", "--amount", "5", "--new-customer")
    assert r.returncode == 0 and "balance 5" in r.stdout, r.stderr
    assert meterd(*grant, "--customer", "newco", "--amount", "1").returncode == 0  # it has an account now
    assert _usd(d, "demo") == 15 * 10**9 and _usd(d, "newco") == 6 * 10**9
    rows = tmp_path / "rows.csv"
    rows.write_text("newco,usd,1\nnewc0,usd,1\nnewcp,usd,1\n")
    r = meterd("grant", "--data-dir", str(d.data_dir), "--from-csv", str(rows))
    assert (r.returncode, r.stderr.strip()) == (2, f"meterd: {rows}:2: customer 'newc0' (and 1 more) is not in the "
                                                   "catalog and has no account: check the id, or pass "
                                                   "--new-customer to create it with this grant")
    assert _usd(d, "newco") == 6 * 10**9  # every row is checked before the first grant
    rows.write_text("newco,usd,-1\n")
    r = meterd("grant", "--data-dir", str(d.data_dir), "--from-csv", str(rows))
    assert r.returncode == 2 and f"{rows}:1: amount: '-1' must be positive; use `meterd adjust`" in r.stderr


HOSTILE = "o1\x1b[2J\x1b]0;owned\x07\nTotal charged (usd): 0.00\u202e"


def test_control_characters_are_escaped_and_a_closed_pipe_ends_quietly(make_daemon):
    import os

    d = make_daemon().start()
    ev = pb.UsageEvent(customer_id="demo", meter="requests", quantity=1, dimensions={"model": HOSTILE,
                                                                                     "user": "u\x1b[31m1"})
    assert d.meter.Report(pb.ReportRequest(event=ev)).decision == pb.DECISION_ALLOW
    period = time.strftime("%Y-%m", time.gmtime())
    d.admin.GetStatement(apb.StatementRequest(customer_id="demo", period=period))  # flushes to the ledger first
    ledger = ("--ledger", f"sqlite:///{d.data_dir / 'ledger.sqlite3'}")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    usage = ("usage", "--customer", "demo", "--from", day, "--to", "2100-01-01", "--group-by", "model,user", *ledger)
    statement = ("statement", "--customer", "demo", "--period", period, *ledger)
    escaped = "o1\\x1b[2J\\x1b]0;owned\\x07\\x0aTotal charged (usd): 0.00\\u202e"
    for args in (usage, statement):
        r = meterd(*args)
        assert r.returncode == 0, r.stderr
        assert escaped[:40] in r.stdout, r.stdout  # a statement cuts descriptions at 58 characters
        assert not any(c in r.stdout for c in "\x1b\x07\u202e") and "\nTotal charged (usd): 0.00\u202e" not in r.stdout
    assert "u\\x1b[31m1" in meterd(*usage).stdout
    assert json.loads(meterd(*statement, "--json").stdout)["lines"]  # JSON escapes by itself
    for args in (("balance", "--customer", "demo", "--target", d.target), usage, statement):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: `meterd ... | head -0`
        r = subprocess.run([sys.executable, "-m", "meterd", *args], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=60)
        os.close(write)
        assert (r.returncode, r.stderr) == (141, ""), (args, r.stderr)


def test_subscriptions_and_the_audit_trail_from_the_command_line(make_daemon):
    root = Path(__file__).resolve().parent.parent
    d = make_daemon(catalog=str(root / "examples" / "cursor.toml")).start()
    data_dir = ["--data-dir", str(d.data_dir)]
    r = meterd("subscribe", *data_dir, "--customer", "acme", "--plan", "pro", "--idempotency-key", "s-1")
    assert r.returncode == 0 and "acme: plan pro, period " in r.stdout, r.stderr
    assert meterd("subscribe", *data_dir, "--customer", "acme", "--plan", "pro", "--idempotency-key",
                  "s-1").returncode == 0  # a repeat subscribes once
    r = meterd("change-plan", *data_dir, "--customer", "acme", "--plan", "nope")
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = meterd("cancel", *data_dir, "--customer", "acme", "--at-period-end")
    assert r.returncode == 0 and "(cancelled at the period's end)" in r.stdout, r.stderr
    r = meterd("audit", *data_dir, "--customer", "acme", "--json")
    kinds = [e["kind"] for e in json.loads(r.stdout)]
    assert r.returncode == 0 and "fee" in kinds and "included" in kinds, r.stdout
    r = meterd("audit", *data_dir, "--customer", "acme", "--limit", "1")
    first = int(r.stdout.split()[0])  # one entry, and where the next page starts
    assert r.returncode == 0 and f"(more after {first}: --after {first})" in r.stdout, r.stdout
    for flag, bad in (("--limit", "-1"), ("--limit", "0"), ("--limit", "1001"), ("--after", "-5"), ("--after", "x")):
        r = meterd("audit", *data_dir, "--customer", "acme", flag, bad)
        assert r.returncode == 2 and f"argument {flag}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = meterd("subscribe", *data_dir, "--customer", "acme", "--plan", "pro", "--start", "yesterday")
    assert r.returncode == 2 and "--start" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert d.stop() == 0  # its last flush: the ledger has the month so far
    this_month = time.strftime("%Y-%m", time.gmtime())
    r = meterd("statement", *data_dir, "--customer", "acme")  # this month by default
    assert r.returncode == 0 and f"Statement for acme, {this_month}" in r.stdout, r.stderr
    r = meterd("usage", *data_dir, "--customer", "acme", "--json")  # likewise
    assert r.returncode == 0, r.stderr
    assert all(time.strftime("%Y-%m", time.gmtime(row["window_start_ms"] / 1000)) == this_month
               for row in json.loads(r.stdout))


def test_a_test_clock_moves_a_month_ahead_and_keeps_its_time(make_daemon):
    root = Path(__file__).resolve().parent.parent
    d = make_daemon(catalog=str(root / "examples" / "cursor.toml"), extra_env={"METERD_TEST_CLOCK": "true"}).start()
    data_dir = ["--data-dir", str(d.data_dir)]
    r = meterd("subscribe", *data_dir, "--customer", "carol", "--plan", "pro")
    assert r.returncode == 0, r.stderr
    end = r.stdout.split(" to ")[1].split()[0].rstrip(";")  # the first period's end, to the second
    r = meterd("advance-clock", *data_dir, "--by", "32d")
    now = r.stdout.split()[-1]
    assert r.returncode == 0 and r.stdout.startswith("the daemon's clock is at ") and now > end, (r.stdout, r.stderr)
    kinds = [e["kind"] for e in json.loads(meterd("audit", *data_dir, "--customer", "carol", "--json").stdout)]
    assert kinds.count("fee") == 2 and kinds.count("included") == 2, kinds  # the renewal happened at once
    r = meterd("report", "--customer", "carol", "requests=1", "--dimension", "model=gpt-4o", "--target", d.target)
    assert r.returncode == 0 and r.stdout.startswith("DECISION_ALLOW"), (r.stdout, r.stderr)
    assert d.stop() == 0  # its last flush
    # statement and usage default to the month of the test clock, not of the machine's
    r = meterd("statement", *data_dir, "--customer", "carol")
    assert r.returncode == 0 and f"Statement for carol, {now[:7]}" in r.stdout, (now, r.stdout, r.stderr)
    r = meterd("usage", *data_dir, "--customer", "carol", "--json")
    assert r.returncode == 0 and [row["meter"] for row in json.loads(r.stdout)] == ["requests"], r.stdout
    d.start()  # the data directory keeps the time
    r = meterd("advance-clock", *data_dir, "--by", "1s")
    assert r.returncode == 0 and r.stdout.split()[-1] > now, r.stdout
    r = meterd("advance-clock", *data_dir, "--to", "2020-01-01")
    assert r.returncode != 0 and "is not ahead of the daemon's clock" in r.stderr and "Traceback" not in r.stderr
    r = meterd("advance-clock", *data_dir, "--by", "soon")
    assert r.returncode != 0 and "a duration such as 30d" in r.stderr
    r = meterd("advance-clock", *data_dir, "--by", "999999999999d")
    assert r.returncode != 0 and "at most 3660 days at a time" in r.stderr and "Traceback" not in r.stderr


def test_a_daemon_on_the_wall_clock_refuses_to_move_it(make_daemon):
    d = make_daemon().start()
    r = meterd("advance-clock", "--data-dir", str(d.data_dir), "--by", "1d")
    assert r.returncode != 0 and "runs on the wall clock" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_text_argument_that_is_not_utf8_is_named_not_a_traceback():
    for args in ([b"--customer", b"a\xe9", b"x=1"], [b"--customer", b"a", b"x\xe9=1"],
                 [b"--customer", b"a", b"x=1", b"--dimension", b"model=\xe9"]):
        r = subprocess.run([sys.executable, "-m", "meterd", "report", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("meterd: ") and "must be valid UTF-8" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
