"""TLS on both listeners, optional mutual TLS, and who may use Admin.

- ``tls_cert_file`` / ``tls_key_file`` turn TLS on for the data plane and the
  admin listener. ``tls_client_ca_file`` adds mutual TLS: a client must then
  present a certificate signed by that CA, on both listeners.
- The files are read again on SIGHUP; new connections use the new
  certificate, open ones keep theirs. A file that cannot be read or parsed
  keeps the current certificate and is logged by name.
- Admin always requires authentication: a bearer token (compared as SHA-256
  digests in constant time) or a client certificate whose name is in
  ``admin_client_names`` (mutual TLS). The token is ``admin_token_file``; by
  default ``<data_dir>/admin.token``, generated at the first start with mode
  0600, so that whoever may read the data directory may use Admin (the CLI
  reads it from there). A TCP admin listener without TLS is refused at start.

- Files and sockets are meterd's own (``check_paths``): the data directory,
  the token files and the admin socket are refused when another user owns
  them or when group or others may write them, and a token file that is a
  symbolic link is refused (another user could have planted it). meterd
  makes its directories 0700 and its files 0600, whatever the umask.

No token or key is ever logged: messages name the setting and the file.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import stat
import threading
import tomllib
from dataclasses import dataclass
from typing import Any

import grpc

from meterd.config import Settings
from meterd.errors import ConfigError

log = logging.getLogger("meterd.security")

TOKEN_BYTES_MIN = 16


# What meterd keeps in its data directory; made 0600 (and tightened so at start,
# for files an earlier version made under a looser umask).
DATA_FILES = ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "ledger.sqlite3-journal",
              "lmdb/data.mdb", "lmdb/lock.mdb", "lmdb/meterd.lock")
DIR_MODE = 0o700
FILE_MODE = 0o600


def _owners() -> set[int]:
    """Who may own a file meterd trusts: its own user, and root (who can read and write anything anyway)."""
    return {os.geteuid(), 0}


def _check_owner_and_mode(setting: str, path: str, st: os.stat_result, owners: set[int]) -> None:
    if st.st_uid not in owners:
        raise ConfigError(f"{setting}: {path} belongs to uid {st.st_uid}, not to meterd's user (uid {os.geteuid()})"
                          f"{' or root' if 0 in owners and os.geteuid() != 0 else ''}; another user could read or "
                          "replace what meterd keeps there")
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        raise ConfigError(f"{setting}: {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); another "
                          f"user could replace what meterd keeps there: chmod go-w {path}")


def _check_dir(setting: str, path: str) -> None:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{setting}: {path} is not a directory")
    _check_owner_and_mode(setting, path, st, {os.geteuid()})


def _check_socket(setting: str, path: str, parent_private: bool) -> None:
    """A Unix socket path meterd is to listen on: its directory is not another user's to change, and
    what is already there is a socket of meterd's user (left by an earlier run), not another user's."""
    parent = os.path.dirname(os.path.abspath(path))
    if parent_private and os.path.isdir(parent):
        _check_owner_and_mode(setting, parent, os.stat(parent), _owners())
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{setting}: {path} exists and is not a socket; remove it if it is not needed")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{setting}: the socket {path} belongs to uid {st.st_uid}, not to meterd's user "
                          f"(uid {os.geteuid()}); another process may be listening there")


def check_server_socket(setting: str, path: str, token_file: str) -> None:
    """Before a client sends a token to a Unix socket: it is a socket owned by this user, root or the owner
    of the token file (the daemon's user), in a directory that nobody else may change, so that no other
    user can have put a listener of their own there to collect the token."""
    owners = {os.geteuid(), 0}
    try:
        owners.add(os.stat(token_file).st_uid)
    except OSError:
        pass  # read_token has said, or will say, what is wrong with it
    parent = os.path.dirname(os.path.abspath(path))
    try:
        _check_owner_and_mode(setting, parent, os.stat(parent), owners)
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{setting}: no socket at {path} (is meterd running with this data directory?)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{setting}: {path} is not a socket; not sending the token there")
    if st.st_uid not in owners:
        raise ConfigError(f"{setting}: the socket {path} belongs to uid {st.st_uid}, neither to this user, root "
                          "nor the token file's owner: another user may be listening there; not sending the token")


def check_paths(settings: Settings, create: bool = False) -> None:
    """Refuse a data directory, token file or socket that another user could read or replace.

    ``create`` (serve) makes a missing data directory 0700 and tightens the
    files meterd keeps in it to 0600; without it (check-config) nothing is
    changed and only what exists is checked, exactly as serve would."""
    data_dir = os.path.abspath(settings.data_dir)
    if create and not os.path.exists(data_dir):
        try:
            os.makedirs(data_dir, mode=DIR_MODE)
        except OSError as e:
            raise ConfigError(f"data_dir: cannot create {data_dir}: {e.strerror}") from None
    if os.path.exists(data_dir):
        _check_dir("data_dir", data_dir)
        if os.path.isdir(os.path.join(data_dir, "lmdb")):
            _check_dir("data_dir", os.path.join(data_dir, "lmdb"))
        for name in DATA_FILES:
            _check_data_file(os.path.join(data_dir, name), create)
    for setting, path in (("admin_token_file", settings.admin_token_path), ("data_tokens_file",
                                                                           settings.data_tokens_file)):
        if path and os.path.lexists(path):
            _private_fd(setting, path, check_only=True)
    if settings.admin_address.startswith("unix:"):
        _check_socket("admin_listen", settings.admin_address[5:], parent_private=True)
    if settings.listen.startswith("unix:"):  # may be shared with another user's client: only the socket itself
        _check_socket("listen", settings.listen[5:], parent_private=False)


def _check_data_file(path: str, tighten: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ConfigError(f"data_dir: {path} is {what}; meterd makes only regular files there, so another user "
                          "may have planted it")
    _check_owner_and_mode("data_dir", path, st, {os.geteuid()})
    if tighten and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, FILE_MODE)


def _private_fd(setting: str, path: str, check_only: bool = False) -> int:
    """Open a file that holds a secret: not through a symbolic link, a regular file of meterd's user or
    root that group and others may not write. Returns the descriptor (closed when ``check_only``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{setting}: {path} is a symbolic link; meterd reads a token file only directly, "
                              "as another user could have planted the link: give the file's own path") from None
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{setting}: {path} is not a regular file")
        _check_owner_and_mode(setting, path, st, _owners())
    except BaseException:
        os.close(fd)
        raise
    if check_only:
        os.close(fd)
    return fd


def read_private(setting: str, path: str) -> bytes:
    """The contents of a file that holds a secret, checked as ``_private_fd`` says."""
    fd = _private_fd(setting, path)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None


def _pem(setting: str, path: str, marker: bytes) -> bytes:
    data = _read(setting, path)
    if marker not in data:
        raise ConfigError(f"{setting}: {path} holds no PEM {marker.decode().strip('- ')}")
    return data


class Credentials:
    """The server's TLS identity, swapped on reload without restarting the listeners.

    Each listener has its own fetcher, which hands every new generation of the
    configuration to its listener once: both listeners move to a reloaded
    certificate, whichever sees a handshake first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self.initial = self._configuration()
        self._current: Any = self.initial
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.tls_cert_file)

    def _configuration(self) -> Any:
        s = self.settings
        key = _pem("tls_key_file", s.tls_key_file, b"PRIVATE KEY-----")
        cert = _pem("tls_cert_file", s.tls_cert_file, b"-----BEGIN CERTIFICATE-----")
        ca = _pem("tls_client_ca_file", s.tls_client_ca_file, b"-----BEGIN CERTIFICATE-----") \
            if s.tls_client_ca_file else None
        try:  # grpc would keep the old pair without a word: check that the key belongs to the certificate
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(s.tls_cert_file, s.tls_key_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls_cert_file: {s.tls_cert_file} and tls_key_file {s.tls_key_file} do not make a "
                              f"certificate and its key ({e})") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for one listener (call once per listener)."""
        seen = [0]

        def fetch() -> Any:  # called by grpc before every new TLS handshake on this listener
            with self._lock:
                if seen[0] == self._generation:
                    return None
                seen[0] = self._generation
                return self._current

        return grpc.dynamic_ssl_server_credentials(self.initial, fetch,
                                                   require_client_authentication=bool(
                                                       self.settings.tls_client_ca_file))

    def reload(self) -> None:
        """Read the certificate files again (SIGHUP). Raises ConfigError and keeps the old ones."""
        config = self._configuration()
        with self._lock:
            self._current = config
            self._generation += 1


class AdminAuth:
    """Decides whether an Admin call is authenticated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = frozenset(n.strip().encode() for n in settings.admin_client_names.split(",") if n.strip())
        self.digest: bytes | None = None
        self.reload()

    def reload(self) -> None:
        """Read the token file again (SIGHUP); raises ConfigError and keeps the old token."""
        path = self.settings.admin_token_path
        if not self.settings.admin_token_file:
            generate_token(path)  # the default file: made once, at the first start
        self.digest = hashlib.sha256(read_token("admin_token_file", path, private=True).encode()).digest()

    def allowed(self, ctx: grpc.aio.ServicerContext) -> bool:
        if self.digest is not None:
            for key, value in ctx.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                    offered = hashlib.sha256(value[7:].strip().encode()).digest()
                    if hmac.compare_digest(offered, self.digest):
                        return True
        if self.names:
            identities = ctx.peer_identities() or []
            if any(name in self.names for name in identities):
                return True
        return False


@dataclass(frozen=True)
class Tenant:
    """Who a data-plane token belongs to, and which customers it may meter."""
    name: str
    prefix: bytes      # customer ids must start with it; no tenant's starts another's
    key: bytes         # namespaces the tenant's batch client ids: name + NUL


_TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DataTokens:
    """Per-tenant bearer tokens for the data plane (``data_tokens_file``).

    The file is TOML, one table per tenant, holding the token's SHA-256 (the
    token itself is never stored) and the prefix of the customer ids it may
    meter::

        [tenants.acme]
        token_sha256 = "<64 hex digits: sha256 of the token>"
        customers = "acme-"
    """

    def __init__(self, settings: Settings) -> None:
        self.path = settings.data_tokens_file
        self.by_digest: dict[bytes, Tenant] = {}
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def reload(self) -> None:
        """Read the file again (SIGHUP); raises ConfigError naming the file and key, keeping the old tokens."""
        if not self.path:
            return
        try:
            doc = tomllib.loads(read_private("data_tokens_file", self.path).decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"data_tokens_file: {self.path} is not valid TOML: {e}") from None
        tenants = doc.get("tenants")
        if not isinstance(tenants, dict) or not tenants or set(doc) != {"tenants"}:
            raise ConfigError(f"data_tokens_file: {self.path}: expected [tenants.NAME] tables and nothing else")
        by_digest: dict[bytes, Tenant] = {}
        for name, spec in tenants.items():
            where = f"{self.path}: tenants.{name}"
            if not _TENANT_NAME.fullmatch(name):
                raise ConfigError(f"data_tokens_file: {where}: a tenant name is 1 to 64 of A-Z a-z 0-9 _ . -")
            if not isinstance(spec, dict) or set(spec) != {"token_sha256", "customers"}:
                raise ConfigError(f"data_tokens_file: {where}: needs token_sha256 and customers, nothing else")
            digest, prefix = spec["token_sha256"], spec["customers"]
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ConfigError(f"data_tokens_file: {where}.token_sha256: must be 64 lowercase hex digits")
            if not isinstance(prefix, str) or not all(0x21 <= ord(c) <= 0x7E for c in prefix) or \
                    not 1 <= len(prefix) <= 64:
                raise ConfigError(f"data_tokens_file: {where}.customers: a customer id prefix, 1 to 64 printable "
                                  "ASCII characters (an empty one would hold every other tenant's customers)")
            if bytes.fromhex(digest) in by_digest:
                raise ConfigError(f"data_tokens_file: {where}.token_sha256: the same token as another tenant")
            by_digest[bytes.fromhex(digest)] = Tenant(name, prefix.encode(), name.encode() + b"\0")
        _check_disjoint(self.path, list(by_digest.values()))
        self.by_digest = by_digest

    def tenant(self, ctx: grpc.aio.ServicerContext) -> Tenant | None:
        """The tenant whose token the call carries, or None."""
        for key, value in ctx.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return self.by_digest.get(hashlib.sha256(value[7:].strip().encode()).digest())
        return None


def _check_disjoint(path: str, tenants: list[Tenant]) -> None:
    """No customer id may belong to two tenants: no prefix starts another. Sorted, a prefix
    comes right before the prefixes that start with it, so neighbours are enough to compare."""
    ordered = sorted(tenants, key=lambda t: t.prefix)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.prefix.startswith(a.prefix):
            raise ConfigError(f"data_tokens_file: {path}: tenants {a.name} (customers {a.prefix.decode()!r}) and "
                              f"{b.name} ({b.prefix.decode()!r}) overlap: every customer id starting with "
                              f"{b.prefix.decode()!r} would be both's; give them prefixes neither of which starts "
                              "the other, such as 'acme-' and 'acmecorp-'")


def generate_token(path: str) -> None:
    """Write a new random token to ``path`` (mode 0600) unless the file exists (a link counts as existing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=DIR_MODE, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    except OSError as e:
        raise ConfigError(f"admin_token_file: cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # whatever the umask
        f.write(secrets.token_urlsafe(32) + "\n")


def read_token(setting: str, path: str, private: bool = False) -> str:
    """A bearer token from a file: printable ASCII, at least TOKEN_BYTES_MIN bytes, surrounding space ignored.
    ``private`` (the daemon's own tokens): the file is checked as ``read_private`` says."""
    token = (read_private(setting, path) if private else _read(setting, path)).strip()
    if len(token) < TOKEN_BYTES_MIN or not all(0x21 <= c <= 0x7E for c in token):
        raise ConfigError(f"{setting}: the token in {path} must be at least {TOKEN_BYTES_MIN} printable ASCII "
                          "characters without spaces")
    return token.decode()


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client side, for the CLI and tests: trust ``ca_file``; present a certificate for mutual TLS."""
    ca = _read("tls_ca_file", ca_file) if ca_file else None
    cert = _read("tls_client_cert_file", cert_file) if cert_file else None
    key = _read("tls_client_key_file", key_file) if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
