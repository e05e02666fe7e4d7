"""Settings precedence and validation; catalog errors that name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meterd.catalog import load_catalog, parse_catalog
from meterd.config import Settings, load_settings
from meterd.errors import ConfigError


def test_defaults_are_embedded():
    s = load_settings({}, env={})
    assert (s.data_dir, s.listen, s.fsync) == ("./meterd-data", "127.0.0.1:50051", True)
    assert s.admin_address.startswith("unix:") and s.admin_address.endswith("meterd-data/admin.sock")
    assert load_catalog(None).meters


def test_flags_beat_environment_beat_file(tmp_path: Path):
    cfg = tmp_path / "meterd.toml"
    cfg.write_text('listen = "127.0.0.1:1"\ndata_dir = "/from/file"\nbatch_events_max = 100\n')
    env = {"METERD_LISTEN": "127.0.0.1:2", "METERD_BATCH_EVENTS_MAX": "200"}
    s = load_settings({"listen": "127.0.0.1:3"}, env=env, config_path=str(cfg))
    assert (s.listen, s.batch_events_max, s.data_dir) == ("127.0.0.1:3", 200, "/from/file")
    s = load_settings({}, env={**env, "METERD_CONFIG": str(cfg)})
    assert s.listen == "127.0.0.1:2"


@pytest.mark.parametrize("env, message", [
    ({"METERD_BATCH_EVENTS_MAX": "lots"}, "METERD_BATCH_EVENTS_MAX: batch_events_max: expected int"),
    ({"METERD_FSYNC": "maybe"}, "METERD_FSYNC: fsync: expected bool"),
    ({"METERD_MAP_SIZE_BYTES": "1000"}, "map_size_bytes: must be at least 1 MiB"),
    ({"METERD_RESERVATION_TTL_S": "7200"}, "reservation_ttl_s"),
    ({"METERD_BATCH_EVENTS_MAX": "100000", "METERD_BATCH_BYTES_MAX": "4096"}, "batch_bytes_max"),
    ({"METERD_MAP_HIGH_WATER_PERCENT": "99"}, "map_high_water_percent: must be 10 to 95"),
    ({"METERD_EVENT_LATE_MAX_S": "4000000"}, r"event_late_max_s: must be 0 to 3456000 \(40 days\)"),
    ({"METERD_EVENT_EARLY_MAX_S": "-1"}, "event_early_max_s: must be 0 to 86400"),
    ({"METERD_TEST_CLOCK": "true", "METERD_BALANCES": "ledger", "METERD_LEDGER": "postgresql://u@db/x"},
     r"test_clock: is for trying plans out, not with ledger \(PostgreSQL\), balances = ledger"),
    ({"METERD_TEST_CLOCK": "true", "METERD_LISTEN": "0.0.0.0:50051"},
     r"test_clock: is for trying plans out, not with listen \(not loopback\)"),
    ({"METERD_MAP_LOW_WATER_PERCENT": "80"}, "map_low_water_percent: must be at least 1 and less than "
                                             "map_high_water_percent"),
    # 20% of a 32 MiB map cannot hold two 4 MiB batches (one admitted under the mark, then its snapshot).
    ({"METERD_MAP_SIZE_BYTES": str(32 << 20)}, r"map_high_water_percent: leaves 6710886 bytes of map_size_bytes "
                                               r"\(33554432\) above it .* two batches of batch_bytes_max "
                                               r"\(4194304\)"),
])
def test_bad_settings_are_named(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env=env)


def test_bad_config_file_is_named(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match=f"{cfg}: nonsense: unknown setting"):
        load_settings({}, env={}, config_path=str(cfg))
    cfg.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, env={}, config_path=str(cfg))


BASE = {"credit_types": {"usd": {}}, "meters": {"t": {"credit_type": "usd", "price": "1"}}}


@pytest.mark.parametrize("patch, key", [
    ({"meters": {"t": {"credit_type": "eur", "price": "1"}}}, "meters.t.credit_type"),
    ({"meters": {"t": {"credit_type": "usd", "price": "-1"}}}, "meters.t.price"),
    ({"meters": {"t": {"credit_type": "usd", "price": 1.5}}}, "meters.t.price"),
    ({"meters": {"t": {"credit_type": "usd", "prices": {"a": "1"}}}}, "meters.t.prices"),
    ({"meters": {"t": {"credit_type": "usd", "price": "1", "precision": 12}}}, "meters.t.precision"),
    ({"meters": {"t": {"credit_type": "usd", "price": "1", "colour": "red"}}}, "meters.t.colour"),
    ({"meters": {"T T": {"credit_type": "usd", "price": "1"}}}, "meters.T T"),
    ({"customers": {"a": {"balances": {"usd": "0.0000000001"}}}}, "customers.a.balances.usd"),
    ({"customers": {"a b": {}}}, "customers.a b"),
    ({"credit_types": {"usd": {"kind": "gold"}}}, "credit_types.usd.kind"),
    ({"meters": {}}, "meters"),
])
def test_catalog_errors_name_file_and_key(patch, key):
    with pytest.raises(ConfigError) as info:
        parse_catalog({**BASE, **patch}, "catalog.toml")
    assert str(info.value).startswith(f"catalog.toml: {key}:"), str(info.value)


def test_catalog_prices_are_exact_fractions():
    cat = parse_catalog({"credit_types": {"req": {"kind": "custom"}},
                         "meters": {"r": {"credit_type": "req", "price_dimension": "model",
                                          "prices": {"haiku": "1/3", "o1": "10"}, "per": 1}}}, "x")
    denominators, _, rates = cat.compile()
    # 1/3 and 10 have a common denominator of 3; in 1/10,000 steps, so that a discount is exact too
    assert denominators == [3 * 10_000]
    assert rates == [(0, (b"haiku",), 10**9, 10_000, ()), (0, (b"o1",), 10**10, 30_000, ())]


@pytest.mark.spawns
def test_check_config_cli(tmp_path: Path):
    ok = subprocess.run([sys.executable, "-m", "meterd", "check-config"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = tmp_path / "cat.toml"
    bad.write_text('[credit_types.usd]\n[meters.t]\ncredit_type = "usd"\nprice = "x"\n')
    r = subprocess.run([sys.executable, "-m", "meterd", "check-config", "--catalog", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}: meters.t.price:" in r.stderr


def test_settings_dataclass_has_units_in_names():
    for name in Settings.__dataclass_fields__:
        if name.endswith(("_max", "_min", "_s", "_us", "_bytes", "_ms", "_file", "_percent")) or name in (
                "data_dir", "listen", "admin_listen", "catalog", "fsync", "log_level", "log_format", "ledger",
                "metrics_listen", "sidecar_id", "admin_client_names", "balances", "test_clock"):
            continue
        raise AssertionError(f"setting {name} does not say its unit or role")


def test_price_too_large_for_64_bits_is_a_config_error():
    with pytest.raises(ConfigError, match="meters.t.price: too large"):
        parse_catalog({**BASE, "meters": {"t": {"credit_type": "usd", "price": "10000000000"}}}, "catalog.toml")


def test_the_readme_catalog_example_is_valid():
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[plans." in b]
    assert blocks, "the README shows a catalog with a plan"
    for block in blocks:
        catalog = parse_catalog(tomllib.loads(block), "README.md")
        assert catalog.plans and catalog.customers


def test_custom_credit_amounts_keep_to_their_decimals():
    doc = {"credit_types": {"req": {"kind": "custom", "decimals": 0}},
           "meters": {"r": {"credit_type": "req", "price": "1/3"}},
           "customers": {"a": {"balances": {"req": "1.5"}}}}
    with pytest.raises(ConfigError, match="customers.a.balances.req: has more decimals than req allows"):
        parse_catalog(doc, "catalog.toml")
    with pytest.raises(ConfigError, match="from 0 to 3 for a custom"):
        parse_catalog({**doc, "credit_types": {"req": {"kind": "custom", "decimals": 4}}}, "catalog.toml")


CATALOG_32_E = """
[credit_types.usd]
kind = "fiat"
currency = "USD"
[meters.tok]
credit_type = "usd"
price = "0.01"
[plans.p.credits.usd]
included = "1"
fallback = "FALLBACK"
"""


@pytest.mark.spawns
@pytest.mark.parametrize("fallback, env, message", [
    ("é" * 32, {}, "plans.p.credits.usd.fallback: must be a mode name of letters, digits and _ (at most 32 bytes"),
    ("slow", {"METERD_CUSTOMER_ID_BYTES_MAX": "3"},
     "customers.acme: the id is longer than customer_id_bytes_max (3 bytes)"),
])
def test_check_config_refuses_exactly_what_serve_refuses(tmp_path: Path, fallback, env, message):
    import os

    from conftest import free_port
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG_32_E.replace("FALLBACK", fallback) + '[customers.acme]\nplan = "p"\n')
    runs = [["check-config", "--catalog", str(catalog)],
            ["serve", "--catalog", str(catalog), "--listen", f"127.0.0.1:{free_port()}"]]
    for args in runs:
        r = subprocess.run([sys.executable, "-m", "meterd", *args, "--data-dir", str(tmp_path / "data")],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith(f"meterd: {catalog}: {message}"), (args, r.stderr)
        assert "Traceback" not in r.stderr
    catalog.write_text(CATALOG_32_E.replace("FALLBACK", "é" * 16))  # 32 bytes: both accept it
    r = subprocess.run([sys.executable, "-m", "meterd", *runs[0]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_reloaded_catalog_gets_the_checks_of_the_start(make_daemon, tmp_path: Path):
    import grpc

    from meterd.v1 import admin_pb2 as apb
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG_32_E.replace("FALLBACK", "slow") + '[customers.ab]\nplan = "p"\n')
    d = make_daemon(catalog=str(catalog), extra_env={"METERD_CUSTOMER_ID_BYTES_MAX": "3"}).start()
    catalog.write_text(CATALOG_32_E.replace("FALLBACK", "slow") + '[customers.abcd]\nplan = "p"\n')
    with pytest.raises(grpc.RpcError) as e:
        d.admin.ReloadCatalog(apb.ReloadCatalogRequest())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == (f"{catalog}: customers.abcd: the id is longer than customer_id_bytes_max "
                                 "(3 bytes)")
