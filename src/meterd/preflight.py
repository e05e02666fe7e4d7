"""What ``serve`` checks before it starts, and ``check-config`` checks without starting.

Both commands go through ``preflight``, so a configuration that check-config
passes is one that serve accepts: the settings, the catalog as the core will
hold it (names counted in bytes, with the settings' limits), the TLS files,
the token files, and the data directory and sockets (``check_paths``).
"""

from __future__ import annotations

import os

from meterd.catalog import Catalog
from meterd.config import Settings
from meterd.errors import ConfigError
from meterd.security import Credentials, DataTokens, check_paths, read_token


def preflight(settings: Settings, catalog: Catalog, create: bool = False) -> None:
    """Raise ConfigError naming the file or setting that serve would refuse.

    ``create`` (serve): make the data directory when it is missing; without
    it nothing on disk is changed."""
    check_paths(settings, create)
    check_core(settings, catalog)
    if settings.balances == "ledger":
        from meterd.leases import check_catalog
        check_catalog(catalog.for_ledger())  # what ledger mode does not serve yet, as the engine refuses it
    check_sidecar_id(settings)
    if settings.listen.startswith("unix:") and not os.path.isdir(os.path.dirname(settings.listen[5:]) or "."):
        raise ConfigError(f"listen: cannot listen on {settings.listen}: its directory does not exist")
    if settings.tls_cert_file:
        Credentials(settings)  # reads the files and checks that the key belongs to the certificate
    DataTokens(settings)
    # The default token is made at the first start; once it exists it is checked as serve reads it.
    if settings.admin_token_file or os.path.lexists(settings.admin_token_path):
        read_token("admin_token_file", settings.admin_token_path, private=True)


def check_core(settings: Settings, catalog: Catalog) -> None:
    """Build the core's tables from the catalog exactly as the engine does at start."""
    from meterd.recovery import new_core

    for c in catalog.customers:  # the engine creates them at start, under the same limit as any call
        if len(c.customer_id.encode()) > settings.customer_id_bytes_max:
            raise ConfigError(f"{catalog.source}: customers.{c.customer_id}: the id is longer than "
                              f"customer_id_bytes_max ({settings.customer_id_bytes_max} bytes)")
    try:
        new_core(settings, catalog.compiled).close()
    except (ValueError, OverflowError) as e:
        raise ConfigError(f"{catalog.source}: the catalog does not fit the core's tables: {e}") from None


def check_sidecar_id(settings: Settings) -> None:
    """A data directory keeps the sidecar id it first flushed under; another one is refused."""
    path = settings.store_path
    if not settings.sidecar_id or not os.path.exists(os.path.join(path, "data.mdb")):
        return
    import lmdb
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=32, subdir=True)  # a running daemon may hold it
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            sid = txn.get(b"sidecar_id", db=meta)
    except lmdb.Error:
        return  # a directory the daemon has not finished making: serve says what is wrong with it
    finally:
        env.close()
    if sid is not None and bytes(sid) != settings.sidecar_id.encode():
        from meterd.flush import sidecar_id_differs
        raise sidecar_id_differs(settings.sidecar_id, bytes(sid).decode())
