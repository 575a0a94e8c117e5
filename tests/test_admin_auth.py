"""QuotaAdmin authentication: bearer tokens, (m)TLS, the non-loopback rule, the CLI.

Servers are real grpc.aio servers from create_admin_server on 127.0.0.1:0 (or
the real ``serve`` on unix sockets), called over real channels. Certificates
are a throwaway CA, server and client certificates made once per session with
the openssl command line; a second CA signs a client certificate the server
must refuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from quota_fixtures import keys_with_prefix
from test_serve_cli import ServeProcess, cli, running_sidecar, short_dir  # noqa: F401  (short_dir is a fixture)

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.addresses import is_loopback_address
from quota_sidecar.server.app import create_admin_server
from quota_sidecar.server.auth import TokenChecker, bearer_token, load_admin_auth, load_tokens
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess

pytestmark = pytest.mark.all_redis_versions

TOKEN_OLD = "old-token-0123456789abcdef"
TOKEN_NEW = "new-token-fedcba9876543210"
CALL_TIMEOUT_SECONDS = 5.0


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by another CA
    rogue_client_key: Path

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_leaf(d, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue-client", "rogue-ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue-client.pem", d / "rogue-client.key")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    """Two tokens mid-rotation, with the comments and blank lines a real file has."""
    path = tmp_path / "admin-tokens"
    path.write_text(f"# rotated 2026-11-01\n\n{TOKEN_OLD}\n   \n# new one\n  {TOKEN_NEW}  \n")
    return str(path)


@contextlib.asynccontextmanager
async def admin_server(settings: Settings, engine: QuotaEngine) -> AsyncIterator[int]:
    server, port = create_admin_server(settings, engine)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def _tls(pki: Pki, *, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca),
                                        private_key=pki.read(key) if key else None,
                                        certificate_chain=pki.read(cert) if cert else None)


@contextlib.asynccontextmanager
async def admin_stub(port: int, credentials: grpc.ChannelCredentials | None = None
                     ) -> AsyncIterator[pb_grpc.QuotaAdminStub]:
    target = f"127.0.0.1:{port}"
    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    async with channel:
        yield pb_grpc.QuotaAdminStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def grant(stub: pb_grpc.QuotaAdminStub, metadata: Sequence[tuple[str, str]] | None,
                purchase_id: str = "p-1", account: str = "acct-auth") -> pb.GrantCreditsResponse:
    return await stub.GrantCredits(pb.GrantCreditsRequest(account_id=account, credits=10, purchase_id=purchase_id),
                                   metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)


async def refused(stub: pb_grpc.QuotaAdminStub, metadata: Sequence[tuple[str, str]] | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grant(stub, metadata)
    return info.value


# --------------------------------------------------------------------------- bearer tokens


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("metadata, message", [
    (None, "requires authentication"),
    (bearer("not-the-token-0123456789"), "not accepted"),
    (bearer(TOKEN_OLD[:-1]), "not accepted"),
    (bearer(TOKEN_OLD + "x"), "not accepted"),
    ((("authorization", TOKEN_OLD),), "Bearer <token>"),
    ((("authorization", f"Basic {TOKEN_OLD}"),), "Bearer <token>"),
    ((("authorization", "Bearer "),), "Bearer <token>"),
    ((("authorization", f"Bearer {TOKEN_OLD}"), ("authorization", f"Bearer {TOKEN_NEW}")), "exactly one"),
    ((("x-token", TOKEN_OLD),), "requires authentication"),
], ids=["none", "wrong", "prefix", "suffix", "no-scheme", "basic", "empty", "twice", "other-header"])
async def test_bad_credentials_are_unauthenticated_and_change_nothing(
        engine: QuotaEngine, token_file: str, redis_client: aioredis.Redis, key_prefix: str,
        metadata: Sequence[tuple[str, str]] | None, message: str) -> None:
    settings = Settings(admin_listen=("127.0.0.1:0",), admin_token_file=token_file)
    async with admin_server(settings, engine) as port, admin_stub(port) as stub:
        err = await refused(stub, metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert message in err.details(), err.details()
        assert TOKEN_OLD not in err.details() and TOKEN_NEW not in err.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SetAccount(pb.SetAccountRequest(account_id="acct-auth", plan="pro"), metadata=metadata,
                                  timeout=CALL_TIMEOUT_SECONDS)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await keys_with_prefix(redis_client, key_prefix) == []


async def test_each_rotated_token_works(engine: QuotaEngine, token_file: str, redis_client: aioredis.Redis,
                                        key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(admin_listen=("127.0.0.1:0",), admin_token_file=token_file)
    async with admin_server(settings, engine) as port, admin_stub(port) as stub:
        r = await grant(stub, bearer(TOKEN_OLD), "p-old")
        assert r.lot.lot_id == "p-old" and r.credit_balance == 10
        r = await grant(stub, bearer(TOKEN_NEW), "p-new")
        assert r.lot.lot_id == "p-new" and r.credit_balance == 20
        # The scheme is case-insensitive (RFC 6750).
        r = await grant(stub, (("authorization", f"bearer {TOKEN_NEW}"),), "p-new")
        assert r.replayed
        s = await stub.SetAccount(pb.SetAccountRequest(account_id="acct-auth", plan="pro"),
                                  metadata=bearer(TOKEN_NEW), timeout=CALL_TIMEOUT_SECONDS)
        assert s.plan == "pro"
        await refused(stub, bearer("nope-nope-nope-nope"))
    assert await keys_with_prefix(redis_client, key_prefix) != []
    logged = caplog.text
    assert TOKEN_OLD not in logged and TOKEN_NEW not in logged and "nope-nope" not in logged


@pytest.mark.newest_redis_only
async def test_health_and_reflection_need_no_token(engine: QuotaEngine, token_file: str) -> None:
    settings = Settings(admin_listen=("127.0.0.1:0",), admin_token_file=token_file)
    async with admin_server(settings, engine) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_SECONDS)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_SECONDS)
            names = [s.name async for resp in responses for s in resp.list_services_response.service]
            assert "quota.v1.QuotaAdmin" in names, names


# --------------------------------------------------------------------------- TLS and mTLS


def _mtls_settings(pki: Pki, token_file: str = "") -> Settings:
    return Settings(admin_listen=("127.0.0.1:0",), admin_tls_cert=str(pki.server_cert),
                    admin_tls_key=str(pki.server_key), admin_client_ca=str(pki.ca), admin_token_file=token_file)


async def test_mtls_needs_a_client_certificate_of_the_ca_and_the_token(
        engine: QuotaEngine, pki: Pki, token_file: str, redis_client: aioredis.Redis, key_prefix: str) -> None:
    async with admin_server(_mtls_settings(pki, token_file), engine) as port:
        # No client certificate, one of another CA, or plaintext: the handshake fails, no call is made.
        for credentials in (_tls(pki), _tls(pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key), None):
            async with admin_stub(port, credentials) as stub:
                err = await refused(stub, bearer(TOKEN_OLD))
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        async with admin_stub(port, _tls(pki, cert=pki.client_cert, key=pki.client_key)) as stub:
            # Both are required: the right certificate without a token is not enough.
            err = await refused(stub, None)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert await keys_with_prefix(redis_client, key_prefix) == []
            r = await grant(stub, bearer(TOKEN_NEW))
            assert r.lot.credits_granted == 10


async def test_mtls_alone_needs_no_token(engine: QuotaEngine, pki: Pki, redis_client: aioredis.Redis,
                                         key_prefix: str) -> None:
    async with admin_server(_mtls_settings(pki), engine) as port:
        async with admin_stub(port, _tls(pki)) as stub:
            assert (await refused(stub, None)).code() == grpc.StatusCode.UNAVAILABLE
        assert await keys_with_prefix(redis_client, key_prefix) == []
        async with admin_stub(port, _tls(pki, cert=pki.client_cert, key=pki.client_key)) as stub:
            assert (await grant(stub, None)).credit_balance == 10


async def test_server_tls_with_token(engine: QuotaEngine, pki: Pki, token_file: str) -> None:
    settings = Settings(admin_listen=("127.0.0.1:0",), admin_tls_cert=str(pki.server_cert),
                        admin_tls_key=str(pki.server_key), admin_token_file=token_file)
    async with admin_server(settings, engine) as port:
        async with admin_stub(port) as stub:  # plaintext cannot talk to a TLS port
            assert (await refused(stub, bearer(TOKEN_OLD))).code() == grpc.StatusCode.UNAVAILABLE
        async with admin_stub(port, _tls(pki)) as stub:
            assert (await refused(stub, None)).code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await grant(stub, bearer(TOKEN_OLD))).credit_balance == 10


def test_bad_tls_files_are_start_up_errors(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    base = dict(admin_listen=("127.0.0.1:0",), admin_tls_cert=str(pki.server_cert), admin_tls_key=str(pki.server_key))
    for field, value in (("admin_tls_cert", str(not_pem)), ("admin_tls_key", str(pki.server_cert)),
                         ("admin_client_ca", str(tmp_path / "missing.pem"))):
        with pytest.raises(ConfigError) as info:
            load_admin_auth(Settings(**{**base, field: value}))
        assert info.value.field == field, info.value.message


# --------------------------------------------------------------------------- settings and the non-loopback rule


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:50052", ":50052", "10.1.2.3:50052", "example.com:50052",
                                     "[::ffff:10.0.0.1]:1"])
def test_non_loopback_admin_without_auth_is_refused(address: str, pki: Pki, token_file: str) -> None:
    assert not is_loopback_address(address)
    with pytest.raises(ConfigError) as info:
        Settings(admin_listen=("127.0.0.1:50052", address))
    assert info.value.field == "admin_listen"
    assert address in info.value.message and "not loopback" in info.value.message, info.value.message
    # Server-only TLS authenticates the server, not the caller: still refused.
    with pytest.raises(ConfigError):
        Settings(admin_listen=(address,), admin_tls_cert=str(pki.server_cert), admin_tls_key=str(pki.server_key))
    # A token file or mTLS makes it acceptable (checked, not bound).
    Settings(admin_listen=(address,), admin_token_file=token_file)
    Settings(admin_listen=(address,), admin_tls_cert=str(pki.server_cert), admin_tls_key=str(pki.server_key),
             admin_client_ca=str(pki.ca))


@pytest.mark.parametrize("address", ["127.0.0.1:50052", "127.9.9.9:1", "[::1]:50052", "localhost:50052",
                                     "LOCALHOST:1", "unix:/tmp/admin.sock", "unix-abstract:quota",
                                     "[::ffff:127.0.0.1]:1"])
def test_loopback_admin_without_auth_is_allowed(address: str) -> None:
    assert is_loopback_address(address)
    assert Settings(admin_listen=(address,)).admin_listen == (address,)


@pytest.mark.parametrize("changes, field", [
    ({"admin_tls_cert": "c.pem"}, "admin_tls_key"),
    ({"admin_tls_key": "k.pem"}, "admin_tls_cert"),
    ({"admin_client_ca": "ca.pem"}, "admin_client_ca"),
])
def test_tls_settings_go_together(changes: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(admin_listen=("127.0.0.1:0",), **changes)
    assert info.value.field == field


def test_settings_from_environment_variables(token_file: str) -> None:
    s = Settings.from_sources({}, {"QUOTA_ADMIN_LISTEN": "0.0.0.0:50052", "QUOTA_ADMIN_TOKEN_FILE": token_file})
    assert s.admin_token_file == token_file
    with pytest.raises(ConfigError):
        Settings.from_sources({}, {"QUOTA_ADMIN_LISTEN": "0.0.0.0:50052"})


# --------------------------------------------------------------------------- token file and the check


@pytest.mark.parametrize("content, expected", [
    ("", "holds no token"),
    ("\n   \n# only a comment\n", "holds no token"),
    ("short\n", "line 1: a token needs at least 16"),
    (f"# c\n{TOKEN_OLD}\ntwo words-0123456789\n", "line 3: a token is printable ASCII"),
    (f"{TOKEN_OLD}é\n", "printable ASCII"),
])
def test_bad_token_files_are_refused_without_showing_tokens(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(content.encode("utf-8"))
    with pytest.raises(ConfigError) as info:
        load_tokens(str(path))
    assert info.value.field == "admin_token_file"
    assert expected in info.value.message, info.value.message
    assert TOKEN_OLD not in info.value.message and "words" not in info.value.message


@pytest.mark.newest_redis_only
def test_unreadable_token_file_fails_create_admin_server(engine: QuotaEngine, tmp_path: Path) -> None:
    settings = Settings(admin_listen=("127.0.0.1:0",), admin_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        create_admin_server(settings, engine)
    assert info.value.field == "admin_token_file" and "cannot read" in info.value.message


def test_token_check_is_exact_and_never_raises() -> None:
    checker = TokenChecker([TOKEN_OLD, TOKEN_NEW])
    assert checker.check(TOKEN_OLD) and checker.check(TOKEN_NEW)
    assert checker.check(TOKEN_OLD.encode())
    rejected: list[str | bytes] = [
        "", TOKEN_OLD[:-1], TOKEN_OLD[1:], TOKEN_OLD + "x", "x" + TOKEN_NEW, TOKEN_OLD + TOKEN_NEW,
        TOKEN_OLD.upper(), f" {TOKEN_OLD}", "é" * 30, "\udcff\x00" + TOKEN_OLD, b"\xff\xfe\x00", b"",
    ]
    for candidate in rejected:
        assert checker.check(candidate) is False, candidate
    assert bearer_token([]) == (None, bearer_token([])[1])
    assert bearer_token([f"Bearer {TOKEN_OLD}"]) == (TOKEN_OLD, "")
    assert bearer_token([TOKEN_OLD])[0] is None


# --------------------------------------------------------------------------- serve and the CLI


def _serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
def test_serve_refuses_an_exposed_admin_address_without_auth(short_dir: str, token_file: str) -> None:
    sock = os.path.join(short_dir, "q.sock")
    serve = ServeProcess(["--listen", f"unix:{sock}", "--admin-listen", "0.0.0.0:0"], _serve_env(), short_dir)
    try:
        assert serve.wait_exit() == 2, serve.stderr
        lines = serve.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("quota-sidecar: bad setting: admin_listen: 0.0.0.0:0 is not"), \
            serve.stderr
    finally:
        serve.kill()

    empty = os.path.join(short_dir, "empty-tokens")
    Path(empty).write_text("# nothing yet\n")
    serve = ServeProcess(["--listen", f"unix:{sock}", "--admin-listen", f"unix:{short_dir}/a.sock",
                          "--admin-token-file", empty], _serve_env(), short_dir)
    try:
        assert serve.wait_exit() == 1, serve.stderr
        lines = serve.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot start: admin_token_file:" in lines[0] and "no token" in lines[0], \
            serve.stderr
        assert not os.path.exists(sock)  # refused before anything was bound
    finally:
        serve.kill()


@pytest.mark.slow
def test_cli_grant_sends_the_token(short_dir: str, token_file: str, redis_server: RedisServerProcess,
                                   key_prefix: str) -> None:
    client_file = os.path.join(short_dir, "my-token")
    Path(client_file).write_text(f"# billing job\n\n{TOKEN_NEW}\n{TOKEN_OLD}\n")
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix,
                         extra=["--admin-token-file", token_file]) as sc:
        base = ("grant", "--account", "acct-cli", "--credits", "10", "--target", sc.admin_target)
        r = cli(*base, "--purchase-id", "p-none")
        assert r.returncode == 1 and r.stderr.startswith("error: UNAUTHENTICATED:"), (r.stdout, r.stderr)
        r = cli(*base, "--purchase-id", "p-wrong", env={"QUOTA_ADMIN_TOKEN": "wrong-wrong-wrong-wrong"})
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, (r.stdout, r.stderr)

        r = cli(*base, "--purchase-id", "p-file", "--token-file", client_file)
        assert r.returncode == 0 and r.stdout.startswith("GRANTED  lot p-file: 10 credit(s)"), (r.stdout, r.stderr)
        r = cli(*base, "--purchase-id", "p-env", env={"QUOTA_ADMIN_TOKEN": TOKEN_OLD})
        assert r.returncode == 0 and "credits available 20" in r.stdout, (r.stdout, r.stderr)
        r = cli("set-account", "--account", "acct-cli", "--plan", "pro", "--target", sc.admin_target,
                env={"QUOTA_ADMIN_TOKEN": TOKEN_OLD})
        assert r.returncode == 0 and r.stdout.strip() == "ACCOUNT  plan pro, time zone UTC, monthly cap none", (r.stdout, r.stderr)

        r = cli(*base, "--purchase-id", "p-x", "--token-file", os.path.join(short_dir, "missing"))
        assert r.returncode == 2 and "cannot read --token-file" in r.stderr, (r.stdout, r.stderr)
        out = cli("balance", "--account", "acct-cli", "--target", sc.target)
        assert "credits available 20, held 0" in out.stdout, (out.stdout, out.stderr)
        assert sc.serve.terminate() == 0, sc.serve.stderr
        log = sc.serve.stderr
    assert "1 bearer token(s)" not in log and "2 bearer token(s)" in log, log
    assert log.count("rejected /quota.v1.QuotaAdmin/GrantCredits") == 2, log
    assert TOKEN_OLD not in log and TOKEN_NEW not in log and "wrong-wrong" not in log


@pytest.mark.slow
def test_cli_over_mtls_on_a_unix_socket(short_dir: str, pki: Pki, token_file: str,
                                        redis_server: RedisServerProcess, key_prefix: str) -> None:
    tls = ["--admin-tls-cert", str(pki.server_cert), "--admin-tls-key", str(pki.server_key),
           "--admin-client-ca", str(pki.ca)]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix,
                         extra=[*tls, "--admin-token-file", token_file]) as sc:
        base = ("grant", "--account", "acct-mtls", "--credits", "10", "--target", sc.admin_target,
                "--tls-server-name", "localhost")
        token = {"QUOTA_ADMIN_TOKEN": TOKEN_OLD}
        r = cli(*base, "--purchase-id", "p-1", "--tls-ca", str(pki.ca), env=token)
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, (r.stdout, r.stderr)
        r = cli(*base, "--purchase-id", "p-1", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                env=token)
        assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr, (r.stdout, r.stderr)
        r = cli(*base, "--purchase-id", "p-1", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                "--tls-key", str(pki.client_key), env=token)
        assert r.returncode == 0 and r.stdout.startswith("GRANTED  lot p-1"), (r.stdout, r.stderr)
        assert "mTLS (client certificate required)" in sc.serve.stderr, sc.serve.stderr
