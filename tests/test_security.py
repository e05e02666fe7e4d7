"""TLS on both listeners, mutual TLS, certificate reload on SIGHUP, and Admin
authentication, against a real daemon with real certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ACME_TOKEN, GLOBEX_TOKEN, tokens_file, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meterd.config import load_settings
from meterd.errors import ConfigError
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import admin_pb2_grpc, meter_pb2_grpc
from meterd.v1 import meter_pb2 as pb

TOKEN = "s3cr3t-admin-token-9f8e7d6c5b4a"


class CA:
    """A throwaway certificate authority that writes PEM files."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names: list[x509.GeneralName] = [x509.DNSName(common_name)]
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, clients = CA("meterd test CA"), CA("meterd client CA")
    files = {"ca": ca.pem(), "client_ca": clients.pem()}
    files["server"], files["server_key"] = ca.issue("meterd", server=True)
    files["ops"], files["ops_key"] = clients.issue("ops", server=False)
    files["app"], files["app_key"] = clients.issue("app", server=False)
    other = CA("another CA")
    files["other_ca"] = other.pem()
    files["other_server"], files["other_server_key"] = other.issue("meterd", server=True)
    files["token"] = (TOKEN + "\n").encode()
    out = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        out[name] = path
    return out


def _creds(pki: dict[str, Path], ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki[ca].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[client].read_bytes() if client else None)


def _tls_env(pki: dict[str, Path], mutual: bool = False) -> dict[str, str]:
    env = {"METERD_TLS_CERT_FILE": str(pki["server"]), "METERD_TLS_KEY_FILE": str(pki["server_key"]),
           "METERD_ADMIN_TOKEN_FILE": str(pki["token"])}
    if mutual:
        env |= {"METERD_TLS_CLIENT_CA_FILE": str(pki["client_ca"]), "METERD_ADMIN_CLIENT_NAMES": "ops"}
    return env


def _grant(channel: grpc.Channel, metadata=None) -> apb.GrantResponse:
    return admin_pb2_grpc.AdminStub(channel).Grant(
        apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=10**9), metadata=metadata, timeout=10)


def _report(channel: grpc.Channel) -> pb.ReportResponse:
    return meter_pb2_grpc.MeterStub(channel).Report(pb.ReportRequest(event=pb.UsageEvent(
        customer_id="acme", meter="input_tokens", quantity=10, dimensions={"model": "gpt-4o"})), timeout=10)


def test_tls_on_both_listeners_and_admin_needs_its_token(make_daemon, pki):
    d = make_daemon(extra_env=_tls_env(pki), credentials=_creds(pki)).start()
    bearer = [("authorization", "Bearer " + TOKEN)]
    assert _grant(d.admin_channel, bearer).balance_nano == 10**9
    assert _report(d.channel).decision == pb.DECISION_ALLOW
    raw = d.connect(d.admin_target)  # TLS, but no token of its own
    for metadata in (None, [("authorization", "Bearer " + TOKEN[:-1] + "x")], [("authorization", TOKEN)]):
        with pytest.raises(grpc.RpcError) as e:
            _grant(raw, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:  # Watch, a stream, is guarded too
        next(iter(admin_pb2_grpc.AdminStub(raw).Watch(apb.WatchRequest(), timeout=5)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for target in (d.target, d.admin_target):  # plaintext is not spoken on either listener
        with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as e:
            _report(ch) if target == d.target else _grant(ch, bearer)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(d.target, _creds(pki, ca="other_ca")) as ch, pytest.raises(grpc.RpcError) as e:
        _report(ch)  # a client that does not trust the daemon's CA
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    d.stop()
    log = d.log_path.read_text()
    assert "refused: not authenticated" in log
    assert TOKEN not in log and TOKEN[:8] not in log


def test_mutual_tls_admits_certified_clients_and_names_who_may_use_admin(make_daemon, pki):
    d = make_daemon(extra_env=_tls_env(pki, mutual=True), credentials=_creds(pki, client="app")).start()
    assert _report(d.channel).decision in (pb.DECISION_ALLOW, pb.DECISION_DENY)  # "app" may use the data plane
    with pytest.raises(grpc.RpcError) as e:
        _grant(d.connect(d.admin_target))  # ...but is not named in admin_client_names (and has no token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.secure_channel(d.admin_target, _creds(pki, client="ops"),
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        assert _grant(ch).balance_nano == 10**9
    assert _grant(d.admin_channel, [("authorization", "Bearer " + TOKEN)]).balance_nano == 2 * 10**9
    with grpc.secure_channel(d.target, _creds(pki)) as ch, pytest.raises(grpc.RpcError) as e:
        _report(ch)  # no client certificate: the handshake fails
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificates_are_read_again_on_sighup(make_daemon, pki):
    d = make_daemon(extra_env=_tls_env(pki), credentials=_creds(pki)).start()
    bearer = [("authorization", "Bearer " + TOKEN)]
    _grant(d.admin_channel, bearer)
    server_cert = pki["server"].read_bytes()

    def reloaded(outcome: str, times: int) -> None:
        """Wait for the daemon to log the outcome of a SIGHUP's certificate reload."""
        wait_until(lambda: d.log_path.read_text().count(outcome) >= times, f"{outcome!r} ({times}) in the log")

    pki["server"].write_bytes(b"not a certificate")
    os.kill(d.proc.pid, signal.SIGHUP)
    reloaded("reloading the TLS certificates failed", 1)
    pki["server"].write_bytes(pki["other_server"].read_bytes())  # a rotation half done: the new
    os.kill(d.proc.pid, signal.SIGHUP)                           # certificate, still the old key
    reloaded("reloading the TLS certificates failed", 2)
    with d.connect(d.target) as ch:
        assert _report(ch).decision == pb.DECISION_ALLOW  # bad files keep the current certificate
    pki["server"].write_bytes(server_cert)
    pki["server"].write_bytes(pki["other_server"].read_bytes())
    pki["server_key"].write_bytes(pki["other_server_key"].read_bytes())
    os.kill(d.proc.pid, signal.SIGHUP)
    reloaded("reloaded the TLS certificates", 1)
    new_ca = _creds(pki, ca="other_ca")
    options = [("grpc.ssl_target_name_override", "localhost")]
    for target, call in ((d.target, lambda ch: _report(ch)), (d.admin_target, lambda ch: _grant(ch, bearer))):
        with grpc.secure_channel(target, new_ca, options=options) as ch:
            call(ch)  # new connections to both listeners get the new certificate
        with grpc.secure_channel(target, _creds(pki), options=options) as ch, pytest.raises(grpc.RpcError):
            call(ch)  # the old CA no longer vouches for the daemon
    d.stop()
    log = d.log_path.read_text()
    assert "reloading the TLS certificates failed" in log and str(pki["server"]) in log
    assert "do not make a certificate and its key" in log


def test_the_cli_presents_the_admin_token_and_trusts_the_certificate(make_daemon, pki, tmp_path):
    env = _tls_env(pki)
    d = make_daemon(extra_env=env, credentials=_creds(pki)).start()
    cmd = [sys.executable, "-m", "meterd", "grant", "--data-dir", str(d.data_dir), "--customer", "acme",
           "--credit-type", "usd", "--amount", "2.50", "--tls-ca", str(pki["ca"]), "--new-customer"]
    r = subprocess.run(cmd, env=os.environ | env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "balance 2.5" in r.stdout
    wrong = tmp_path / "wrong-token"
    wrong.write_text("x" * 32)
    r = subprocess.run(cmd + ["--token-file", str(wrong)], env=os.environ | env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "UNAUTHENTICATED" in r.stderr


@pytest.mark.parametrize("settings, field", [
    ({"admin_listen": "127.0.0.1:7777", "admin_token_file": "/t"}, "admin_listen: a TCP admin listener needs TLS"),
    ({"tls_cert_file": "/c"}, "tls_cert_file: tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "/ca"}, "tls_client_ca_file: mutual TLS needs"),
    ({"admin_client_names": "ops"}, "admin_client_names: client certificates need tls_client_ca_file"),
])
def test_settings_that_would_expose_admin_are_refused(settings, field):
    with pytest.raises(ConfigError, match=field):
        load_settings(settings, env={})


def test_admin_always_needs_a_token_by_default_the_one_in_the_data_directory(make_daemon, tmp_path):
    d = make_daemon().start()
    token_file = d.data_dir / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert _grant(d.admin_channel).balance_nano == 10**9  # the harness sends the daemon's own token
    with grpc.insecure_channel(d.admin_target) as raw, pytest.raises(grpc.RpcError) as e:
        _grant(raw)  # even on the 0600 socket: no token, no Admin
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = token_file.read_text().strip()
    d.restart()  # the token is made once and kept
    assert token_file.read_text().strip() == token
    r = subprocess.run([sys.executable, "-m", "meterd", "grant", "--data-dir", str(d.data_dir), "--customer", "acme",
                        "--credit-type", "usd", "--amount", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # the CLI finds the token in the data directory
    d.stop()
    assert token not in d.log_path.read_text()


def test_unreadable_or_bad_files_are_named(make_daemon, pki, tmp_path):
    short = tmp_path / "short-token"
    short.write_text("abc")
    for env, message in (
            (_tls_env(pki) | {"METERD_TLS_KEY_FILE": str(tmp_path / "missing.pem")}, "tls_key_file: cannot read"),
            (_tls_env(pki) | {"METERD_TLS_CERT_FILE": str(short)}, "tls_cert_file: " + str(short)),
            ({"METERD_ADMIN_TOKEN_FILE": str(short)}, "admin_token_file: the token in " + str(short))):
        d = make_daemon(extra_env=env, name=f"bad{len(message)}")
        with pytest.raises(RuntimeError, match="meterd exited") as e:
            d.start(timeout_s=20)
        assert message in str(e.value)


def _tokens_file(tmp_path: Path) -> Path:
    return tokens_file(tmp_path)


def test_data_plane_tokens_confine_each_tenant_to_its_customers(make_daemon, tmp_path):
    d = make_daemon(extra_env={"METERD_DATA_TOKENS_FILE": str(_tokens_file(tmp_path))}).start()
    for customer in ("acme-1", "globex-1"):
        d.admin.Grant(apb.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=10**12))
    acme, globex = [("authorization", "Bearer " + ACME_TOKEN)], [("authorization", "Bearer " + GLOBEX_TOKEN)]
    stub = meter_pb2_grpc.MeterStub(d.channel)

    def event(customer: str) -> pb.UsageEvent:
        return pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=1000, dimensions={"model": "gpt-4o"})

    def code(fn, request, metadata):
        try:
            fn(request, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    assert code(stub.Report, pb.ReportRequest(event=event("acme-1")), acme) == grpc.StatusCode.OK
    assert code(stub.Report, pb.ReportRequest(event=event("acme-1")), None) == grpc.StatusCode.UNAUTHENTICATED
    assert code(stub.Report, pb.ReportRequest(event=event("acme-1")),
                [("authorization", "Bearer wrong-token-000000000")]) == grpc.StatusCode.UNAUTHENTICATED
    assert code(stub.Report, pb.ReportRequest(event=event("globex-1")), acme) == grpc.StatusCode.PERMISSION_DENIED
    keyed = event("globex-1")
    keyed.idempotency_key = "k1"
    assert code(stub.Report, pb.ReportRequest(event=keyed), globex) == grpc.StatusCode.OK
    assert code(stub.Report, pb.ReportRequest(event=keyed), acme) == grpc.StatusCode.PERMISSION_DENIED  # no replay
    # One foreign event rejects the whole batch; nothing is applied.
    batch = pb.ReportBatchRequest(client_id="c", sequence=1, events=[event("acme-1"), event("globex-1")])
    assert code(stub.ReportBatch, batch, acme) == grpc.StatusCode.PERMISSION_DENIED
    # Client ids are per tenant: globex's sequence 5 does not make acme's batches duplicates.
    assert stub.ReportBatch(pb.ReportBatchRequest(client_id="c", sequence=5, events=[event("globex-1")]),
                            metadata=globex).accepted == 1
    r = stub.ReportBatch(pb.ReportBatchRequest(client_id="c", sequence=2, events=[event("acme-1")]), metadata=acme)
    assert (r.accepted, r.duplicate) == (1, False)
    assert code(stub.GetBalance, pb.GetBalanceRequest(customer_id="globex-1"), acme) == \
        grpc.StatusCode.PERMISSION_DENIED
    auth = stub.Authorize(pb.AuthorizeRequest(customer_id="globex-1", meter="output_tokens", quantity=10,
                                              dimensions={"model": "gpt-4o"}), metadata=globex)
    assert code(stub.Authorize, pb.AuthorizeRequest(customer_id="globex-1", meter="output_tokens", quantity=10,
                                                    dimensions={"model": "gpt-4o"}), acme) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.Commit, pb.CommitRequest(reservation_id=auth.reservation_id, quantity=1), acme) == \
        grpc.StatusCode.NOT_FOUND  # another tenant's reservation is not even said to exist
    assert code(stub.Commit, pb.CommitRequest(reservation_id=auth.reservation_id, quantity=1), globex) == \
        grpc.StatusCode.OK
    session = stub.StartSession(pb.StartSessionRequest(customer_id="acme-1", meter="gpu_seconds",
                                                       dimensions={"hardware": "nvidia-h100"}), metadata=acme)
    assert code(stub.Heartbeat, pb.HeartbeatRequest(session_id=session.session_id), globex) == \
        grpc.StatusCode.NOT_FOUND
    assert code(stub.EndSession, pb.EndSessionRequest(session_id=session.session_id), acme) == grpc.StatusCode.OK
    chosen = {}  # a session id a client chooses is its tenant's own: no squatting, no probing
    for name, metadata, customer in (("globex", globex, "globex-1"), ("acme", acme, "acme-1")):
        chosen[name] = stub.StartSession(pb.StartSessionRequest(
            customer_id=customer, meter="gpu_seconds", dimensions={"hardware": "cpu"}, session_id="job-42"),
            metadata=metadata).session_id
    assert chosen == {"globex": "globex:job-42", "acme": "acme:job-42"}
    for name, metadata in (("globex", globex), ("acme", acme)):
        stub.EndSession(pb.EndSessionRequest(session_id=chosen[name]), metadata=metadata)
    balances = {c: stub.GetBalance(pb.GetBalanceRequest(customer_id=c), metadata=m).usage
                for c, m in (("acme-1", acme), ("globex-1", globex))}
    assert [int(u.quantity) for u in balances["acme-1"] if u.meter == "input_tokens"] == [2000]
    assert [int(u.quantity) for u in balances["globex-1"] if u.meter == "input_tokens"] == [2000]
    d.stop()
    log = d.log_path.read_text()
    assert ACME_TOKEN not in log and GLOBEX_TOKEN not in log and "no valid token" in log


@pytest.mark.parametrize("text, message", [
    ("[tenants.acme]\ntoken_sha256 = \"abc\"\ncustomers = \"a\"\n", "tenants.acme.token_sha256: must be 64"),
    ("[tenants.acme]\ncustomers = \"a\"\n", "tenants.acme: needs token_sha256 and customers"),
    ("[other]\n", "expected [tenants.NAME] tables"),
    ("not toml [", "is not valid TOML"),
])
def test_a_bad_tokens_file_is_named(tmp_path, text, message):
    from meterd.security import DataTokens
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="data_tokens_file: " + str(path)) as e:
        DataTokens(load_settings({}, env={"METERD_DATA_TOKENS_FILE": str(path)}))
    assert message in str(e.value)


# --- the data directory, the token files and the sockets are meterd's user's own ---------------------------------

NOBODY = 65534  # another local user (the tests run as root, which may give files away)


def _meterd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meterd", *args], capture_output=True, text=True, timeout=60)


def test_directories_are_0700_and_files_0600_under_umask_022(make_daemon):
    old = os.umask(0o022)
    try:
        d = make_daemon().start()
    finally:
        os.umask(old)
    _grant(d.admin_channel)
    assert (d.data_dir / "admin.sock").stat().st_mode & 0o777 == 0o600
    d.stop()
    modes = {str(p.relative_to(d.data_dir)): p.stat().st_mode & 0o777 for p in [d.data_dir, *d.data_dir.rglob("*")]}
    assert modes.pop(".") == modes.pop("lmdb") == 0o700
    assert {"admin.token", "ledger.sqlite3", "lmdb/data.mdb", "lmdb/lock.mdb", "lmdb/meterd.lock"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes
    # Files an earlier version left readable by others are tightened at the next start.
    (d.data_dir / "lmdb" / "data.mdb").chmod(0o644)
    (d.data_dir / "ledger.sqlite3").chmod(0o644)
    d.start()
    assert (d.data_dir / "lmdb" / "data.mdb").stat().st_mode & 0o777 == 0o600
    assert (d.data_dir / "ledger.sqlite3").stat().st_mode & 0o777 == 0o600


def _token(path: Path) -> Path:
    path.write_text("a-long-enough-admin-token-1234\n")
    return path


def _socket_of(path: Path, uid: int) -> Any:
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, uid, -1)
    return s


def _plant(case: str, data: Path, tmp_path: Path) -> tuple[dict[str, str], str]:
    """Set up one thing another user could have done; returns the settings and the message expected."""
    data.mkdir(mode=0o700)
    if case == "data dir 0777":
        data.chmod(0o777)
        return {}, f"data_dir: {data} is writable by group and others (mode 0777)"
    if case == "data dir of another user":
        os.chown(data, NOBODY, -1)
        return {}, f"data_dir: {data} belongs to uid {NOBODY}"
    if case == "token a symlink":
        (data / "admin.token").symlink_to(_token(tmp_path / "planted.token"))
        return {}, f"admin_token_file: {data / 'admin.token'} is a symbolic link"
    if case == "token of another user":
        os.chown(_token(data / "admin.token"), NOBODY, -1)
        return {}, f"admin_token_file: {data / 'admin.token'} belongs to uid {NOBODY}"
    if case == "token group-writable":
        _token(tmp_path / "admin.token").chmod(0o620)
        return ({"METERD_ADMIN_TOKEN_FILE": str(tmp_path / "admin.token")},
                f"admin_token_file: {tmp_path / 'admin.token'} is writable by group (mode 0620)")
    if case == "tenant tokens world-writable":
        tokens = _tokens_file(tmp_path)
        tokens.chmod(0o646)
        return {"METERD_DATA_TOKENS_FILE": str(tokens)}, f"data_tokens_file: {tokens} is writable by others"
    if case == "socket a regular file":
        (data / "admin.sock").write_text("")
        return {}, f"admin_listen: {data / 'admin.sock'} exists and is not a socket"
    if case == "socket of another user":
        _plant.sockets.append(_socket_of(data / "admin.sock", NOBODY))  # type: ignore[attr-defined]
        return {}, f"admin_listen: the socket {data / 'admin.sock'} belongs to uid {NOBODY}"
    if case == "map of another user":
        (data / "lmdb").mkdir(mode=0o700)
        os.chown(_token(data / "lmdb" / "data.mdb"), NOBODY, -1)
        return {}, f"data_dir: {data / 'lmdb' / 'data.mdb'} belongs to uid {NOBODY}"
    raise ValueError(case)


_plant.sockets = []  # type: ignore[attr-defined]
PLANTED = ["data dir 0777", "data dir of another user", "token a symlink", "token of another user",
           "token group-writable", "tenant tokens world-writable", "socket a regular file", "socket of another user",
           "map of another user"]


@pytest.mark.spawns
@pytest.mark.parametrize("case", PLANTED)
def test_what_another_user_could_read_or_replace_is_refused_by_check_config_and_serve(case, tmp_path):
    from conftest import free_port
    data = tmp_path / "data"
    env, message = _plant(case, data, tmp_path)
    before = sorted(str(p) for p in data.rglob("*"))
    for command in (["check-config"], ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        r = subprocess.run([sys.executable, "-m", "meterd", *command, "--data-dir", str(data)],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr.count("\n")) == (2, 1), r.stderr
        assert r.stderr.startswith("meterd: " + message) and "Traceback" not in r.stderr, r.stderr
        assert sorted(str(p) for p in data.rglob("*")) == before  # nothing was made before the refusal
    for s in _plant.sockets:  # type: ignore[attr-defined]
        s.close()


def test_the_cli_sends_the_admin_token_only_to_the_daemons_own_socket(make_daemon, tmp_path):
    d = make_daemon().start()
    grant = ("grant", "--data-dir", str(d.data_dir), "--customer", "demo", "--credit-type", "usd", "--amount", "1")
    assert _meterd(*grant).returncode == 0
    sock = d.data_dir / "admin.sock"
    sock.rename(d.data_dir / "real.sock")
    fake = _socket_of(sock, NOBODY)  # another user's listener, in place of the daemon's
    fake.setblocking(False)
    try:
        r = _meterd(*grant)
        assert r.returncode == 2 and f"admin_listen: the socket {sock} belongs to uid {NOBODY}" in r.stderr, r.stderr
        assert "not sending the token" in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(BlockingIOError):
            fake.accept()  # nobody even connected
    finally:
        fake.close()
    sock.unlink()
    sock.write_text("")  # not a socket at all
    r = _meterd(*grant)
    assert r.returncode == 2 and f"admin_listen: {sock} is not a socket" in r.stderr, r.stderr
    sock.unlink()
    (d.data_dir / "real.sock").rename(sock)
    open_dir = tmp_path / "open"  # the daemon's own socket, but in a directory anyone may change
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "admin.sock").symlink_to(sock)
    r = _meterd(*grant, "--admin-listen", f"unix:{open_dir / 'admin.sock'}")
    assert r.returncode == 2 and f"admin_listen: {open_dir} is writable by group and others" in r.stderr, r.stderr
    assert _meterd(*grant).returncode == 0  # the daemon's own socket, as before


def _tenants(path: Path, *tenants: tuple[str, str, str]) -> Path:
    import hashlib
    path.write_text("".join(f'[tenants.{name}]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
                            f'customers = "{prefix}"\n' for name, token, prefix in tenants))
    return path


@pytest.mark.parametrize("prefixes, message", [
    (("acme", "acmecorp-"), "tenants acme (customers 'acme') and b ('acmecorp-') overlap"),
    (("acme-", "acme-"), "tenants acme (customers 'acme-') and b ('acme-') overlap"),
    (("acme-eu-", "x-", "acme-"), "tenants c (customers 'acme-') and acme ('acme-eu-') overlap"),
    (("", "acme-"), "tenants.acme.customers: a customer id prefix, 1 to 64 printable ASCII characters"),
])
def test_tenant_prefixes_must_not_overlap_nor_be_empty(tmp_path, prefixes, message):
    from meterd.security import DataTokens
    names = ["acme", "b", "c"]
    path = _tenants(tmp_path / "tokens.toml", *[(n, f"{n}-token-0123456789abcdef", p)
                                                for n, p in zip(names, prefixes, strict=False)])
    with pytest.raises(ConfigError, match="data_tokens_file: " + str(path)) as e:
        DataTokens(load_settings({}, env={"METERD_DATA_TOKENS_FILE": str(path)}))
    assert message in str(e.value)


def test_a_reload_with_overlapping_prefixes_keeps_the_current_tokens(make_daemon, tmp_path):
    path = _tenants(tmp_path / "tokens.toml", ("acme", ACME_TOKEN, "acme-"))
    d = make_daemon(extra_env={"METERD_DATA_TOKENS_FILE": str(path)}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="acme-1", credit_type="usd", amount_nano=10**12))
    balance = pb.GetBalanceRequest(customer_id="acme-1")
    stub = meter_pb2_grpc.MeterStub(d.channel)
    _tenants(path, ("acme", ACME_TOKEN, "acme"), ("corp", GLOBEX_TOKEN, "acmecorp-"))

    def reload_and_wait(line: str) -> str:
        seen = d.log_path.read_text().count(line)
        d.proc.send_signal(signal.SIGHUP)
        # The daemon logs each reload's outcome.
        wait_until(lambda: d.log_path.read_text().count(line) > seen, "the daemon to log the reload")
        return d.log_path.read_text()

    log = reload_and_wait("reloading the data plane tokens failed")
    assert f"data_tokens_file: {path}: tenants acme (customers 'acme') and corp ('acmecorp-') overlap" in log
    stub.GetBalance(balance, metadata=[("authorization", "Bearer " + ACME_TOKEN)], timeout=10)  # still acme's
    with pytest.raises(grpc.RpcError) as e:
        stub.GetBalance(balance, metadata=[("authorization", "Bearer " + GLOBEX_TOKEN)], timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _tenants(path, ("acme", ACME_TOKEN, "acme-"), ("corp", GLOBEX_TOKEN, "acmecorp-"))
    reload_and_wait("reloaded the data plane tokens")
    with pytest.raises(grpc.RpcError) as e:
        stub.GetBalance(balance, metadata=[("authorization", "Bearer " + GLOBEX_TOKEN)], timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a tenant now, of other customers


def test_reflection_on_the_data_port_describes_only_the_data_plane(make_daemon):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    d = make_daemon().start()
    data = ProtoReflectionDescriptorDatabase(d.channel)
    assert set(data.get_services()) == {"meterd.v1.Meter", "grpc.health.v1.Health",
                                        "grpc.reflection.v1alpha.ServerReflection"}
    assert data.FindFileContainingSymbol("meterd.v1.Meter").name == "meterd/v1/meter.proto"
    assert data.FindFileContainingSymbol("meterd.v1.ReportRequest").message_type
    for symbol in ("meterd.v1.Admin", "meterd.v1.GrantRequest"):
        with pytest.raises(KeyError):
            data.FindFileContainingSymbol(symbol)
    with pytest.raises(KeyError):
        data.FindFileByName("meterd/v1/admin.proto")
    admin = ProtoReflectionDescriptorDatabase(d.admin_channel)  # the admin listener describes its own API
    assert "meterd.v1.Admin" in admin.get_services()
    assert admin.FindFileContainingSymbol("meterd.v1.GrantRequest").name == "meterd/v1/admin.proto"
    with pytest.raises(KeyError):
        admin.FindFileContainingSymbol("meterd.v1.ReportBatchRequest")
