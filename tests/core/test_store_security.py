"""The store under the least-privilege ACL user of ``idemtask.store.acl`` and over TLS, on
real ``redis-server`` processes.

The contract's test functions are imported into this module (as the scale tests do), so
pytest runs the whole contract here with this module's ``store`` fixture.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
import trustme

from idemtask.config import Settings
from idemtask.doctor import check_store
from idemtask.errors import StoreUnavailable
from idemtask.findings import Level
from idemtask.store import RedisStore, Store
from idemtask.store.acl import acl_rules

from servers import LOOPBACK, RedisServer, free_port

PASSWORD = "s3cret-acl-pass"


def _contract_module() -> ModuleType:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("test_store_contract")


_contract = _contract_module()
CONTRACT_TESTS = sorted(name for name in vars(_contract) if name.startswith("test_"))
globals().update({name: getattr(_contract, name) for name in CONTRACT_TESTS})


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        admin = server.client()
        admin.execute_command(
            "ACL", "SETUSER", "idemtask", "on", f">{PASSWORD}", *acl_rules().split()
        )
        admin.close()
        yield server


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 signed by it, and another CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK, "localhost")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "other_ca": folder / "other-ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return files


@pytest.fixture(scope="module")
def tls_server(tls_files: dict[str, Path]) -> Iterator[tuple[RedisServer, int]]:
    tls_port = free_port()
    config = {
        "tls-port": str(tls_port),
        "tls-cert-file": str(tls_files["cert"]),
        "tls-key-file": str(tls_files["key"]),
        "tls-ca-cert-file": str(tls_files["ca"]),
        "tls-auth-clients": "no",
    }
    with RedisServer(config=config) as server:
        yield server, tls_port


def _tls_url(port: int, ca: Path) -> str:
    return f"rediss://{LOOPBACK}:{port}/0?ssl_ca_certs={ca}"


@pytest.fixture(params=["acl", "tls"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "acl":
        server: RedisServer = request.getfixturevalue("acl_server")
        url = f"redis://idemtask:{PASSWORD}@{LOOPBACK}:{server.port}/0"
    else:
        server, port = request.getfixturevalue("tls_server")
        url = _tls_url(port, request.getfixturevalue("tls_files")["ca"])
    admin = server.client()
    admin.flushall()
    admin.script_flush()  # every run starts with no scripts: SCRIPT LOAD must be allowed too
    admin.close()
    redis_store = RedisStore.from_url(url)
    yield redis_store
    redis_store.client.close()


def test_the_whole_contract_is_imported() -> None:
    assert len(CONTRACT_TESTS) >= 20
    assert all(callable(globals()[name]) for name in CONTRACT_TESTS)


@pytest.mark.parametrize(
    "command",
    [
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("SET", "idemtask:x", "1"),
        ("HSET", "other:{k}", "s", "done"),
        ("HGETALL", "other:{k}"),
        ("DEL", "other:{k}"),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "FLUSH"),
    ],
)
def test_the_store_user_can_run_nothing_else(
    acl_server: RedisServer, command: tuple[str, ...]
) -> None:
    client = redis.Redis(
        host=LOOPBACK, port=acl_server.port, username="idemtask", password=PASSWORD
    )
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()


def test_a_script_cannot_touch_keys_outside_the_prefix(acl_server: RedisServer) -> None:
    """Key patterns apply to what a script calls too: the user's scripts stay on its keys."""
    store = RedisStore.from_url(f"redis://idemtask:{PASSWORD}@{LOOPBACK}:{acl_server.port}/0")
    outside = RedisStore(store.client, prefix="other")
    try:
        with pytest.raises(StoreUnavailable):
            outside.reserve(
                "k", task_id="t", task_name="n", fingerprint="", reservation_ms=1000, ttl_ms=1000
            )
    finally:
        store.client.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idemtask", *args], capture_output=True, text=True, timeout=60
    )


def test_a_wrong_ca_is_one_clear_error(
    tls_server: tuple[RedisServer, int], tls_files: dict[str, Path]
) -> None:
    url = _tls_url(tls_server[1], tls_files["other_ca"])
    store = RedisStore.from_url(url)
    with pytest.raises(StoreUnavailable, match="certificate verify failed"):
        store.ping()
    store.client.close()
    done = run_cli("--redis", url, "stats")
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "certificate verify failed" in lines[0], done.stderr


def test_the_password_never_reaches_the_cli_output(acl_server: RedisServer) -> None:
    wrong = f"redis://idemtask:not-{PASSWORD}@{LOOPBACK}:{acl_server.port}/0"
    done = run_cli("--redis", wrong, "stats")
    assert done.returncode != 0
    assert f"not-{PASSWORD}" not in done.stdout + done.stderr


def test_the_doctor_as_the_store_user_says_which_checks_it_could_not_run(
    acl_server: RedisServer,
) -> None:
    """The store user may not run INFO or CONFIG GET: the store is reachable and works, and
    the doctor says the eviction and persistence checks were not run, not that it failed."""
    url = f"redis://idemtask:{PASSWORD}@{LOOPBACK}:{acl_server.port}/0"
    findings = {f.code: f for f in check_store(Settings(redis_url=url))}
    assert findings["store.reachable"].level is Level.OK, findings
    for code in ("store.eviction", "store.persistence"):
        assert findings[code].level is Level.WARNING, findings
        assert "not checked" in findings[code].message and "NOPERM" in findings[code].message
    assert PASSWORD not in " ".join(str(f) for f in findings.values())


def test_the_doctor_checks_everything_with_the_doctor_rules(acl_server: RedisServer) -> None:
    admin = acl_server.client()
    admin.execute_command(
        "ACL", "SETUSER", "doctor", "on", f">{PASSWORD}", *acl_rules(doctor=True).split()
    )
    admin.close()
    url = f"redis://doctor:{PASSWORD}@{LOOPBACK}:{acl_server.port}/0"
    findings = {f.code: f for f in check_store(Settings(redis_url=url))}
    assert findings["store.reachable"].level is Level.OK, findings
    assert "not checked" not in findings["store.eviction"].message, findings
    assert "not checked" not in findings["store.persistence"].message, findings
