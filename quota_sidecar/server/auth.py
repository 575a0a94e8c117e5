"""Authentication of the QuotaAdmin API: bearer tokens and (m)TLS.

Two independent layers, both optional on loopback and at least one required
elsewhere (see ``admin_auth_problem``) and on a unix socket other users may
open (``admin_socket_mode_problem``):

- a bearer token in the ``authorization`` metadata (``Bearer <token>``),
  checked by ``AdminAuthInterceptor`` against the tokens of
  ``--admin-token-file`` before any QuotaAdmin handler runs;
- TLS on ``--admin-listen`` (``--admin-tls-cert``/``--admin-tls-key``), and
  with ``--admin-client-ca`` a client certificate signed by that CA, which the
  TLS layer itself verifies during the handshake (a client without one never
  gets to send a call).

Health and reflection on the admin server need no token: probes use them and
they change nothing. Token values are never logged and never put in error
messages; only file names and line numbers are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

import grpc

from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.settings import Settings, admin_auth_problem, admin_socket_mode_problem

log = logging.getLogger("quota_sidecar.server.auth")

ADMIN_METHOD_PREFIX = "/quota.v1.QuotaAdmin/"
# A guessable token on a billing API is no protection; 16 printable characters is a floor, not a goal.
MIN_TOKEN_CHARS = 16

_MISSING = "QuotaAdmin requires authentication: send metadata 'authorization: Bearer <token>'"
_MALFORMED = "QuotaAdmin authorization metadata must be exactly one 'Bearer <token>'"
_WRONG = "QuotaAdmin token not accepted"


# --------------------------------------------------------------------------- addresses


# --------------------------------------------------------------------------- tokens


def _read(field_name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(field_name, f"cannot read {path}: {exc.strerror or exc}") from None


def load_tokens(path: str, field_name: str = "admin_token_file") -> tuple[str, ...]:
    """The tokens of a token file: one per line; blank lines and # comments ignored.

    Raises ConfigError (naming the line, never its content) for an
    unreadable or token-less file and for tokens that could not be sent as
    gRPC metadata or are too short.
    """
    raw = _read(field_name, path)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(field_name, f"{path}: tokens must be printable ASCII") from None
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(not 0x21 <= ord(c) <= 0x7E for c in token):
            raise ConfigError(field_name, f"{path} line {number}: a token is printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(field_name, f"{path} line {number}: a token needs at least {MIN_TOKEN_CHARS} "
                                              "characters")
        tokens.append(token)
    if not tokens:
        raise ConfigError(field_name, f"{path} holds no token (only blank lines or # comments)")
    return tuple(tokens)


def _digest(value: str | bytes) -> bytes:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(data).digest()


class TokenChecker:
    """Constant-time membership test of a presented token against the accepted ones.

    Both sides are hashed first, so every comparison is between equal-length
    digests (the time does not reveal a token's length) and any input,
    including non-ASCII text, is comparable without raising. Every token is
    compared, without stopping at the first match, so the time does not reveal
    which token of a rotation matched either.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(t) for t in tokens)
        assert self._digests, "TokenChecker needs at least one token"

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | bytes) -> bool:
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def bearer_token(values: Sequence[str | bytes]) -> tuple[str | bytes | None, str]:
    """(token, '') from the ``authorization`` metadata values, or (None, why not)."""
    if not values:
        return None, _MISSING
    if len(values) != 1:
        return None, _MALFORMED
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.partition(" ")
    # RFC 6750: the scheme name is case-insensitive.
    if scheme.lower() != "bearer" or not token:
        return None, _MALFORMED
    return token, ""


# --------------------------------------------------------------------------- interceptor


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts: the real one never runs."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]
    return kind(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects QuotaAdmin calls without an accepted bearer token; other services pass."""

    def __init__(self, checker: TokenChecker) -> None:
        self._checker = checker

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(ADMIN_METHOD_PREFIX):
            return handler
        values = [v for k, v in (handler_call_details.invocation_metadata or ()) if k.lower() == "authorization"]
        token, why = bearer_token(values)
        if token is not None:
            if self._checker.check(token):
                return handler
            why = _WRONG
        log.warning("rejected %s: %s", method, why)
        return _denying_handler(handler, why)


# --------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class AdminAuth:
    """What the admin server enforces, loaded from the files once at start-up."""

    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    credentials: grpc.ServerCredentials | None
    token_count: int
    mtls: bool

    def describe(self) -> str:
        parts = [f"{self.token_count} bearer token(s)"] if self.token_count else []
        if self.credentials is not None:
            parts.append("mTLS (client certificate required)" if self.mtls else "TLS")
        return " + ".join(parts) or "no authentication"


def _pem(field_name: str, path: str, marker: bytes) -> bytes:
    data = _read(field_name, path)
    # grpc only complains about bad PEM at the first handshake; say so at start-up instead.
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(field_name, f"{path} is not a PEM file with a {marker.decode()} block")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the admin addresses, or None for plaintext."""
    if not settings.admin_tls_cert:
        return None
    chain = _pem("admin_tls_cert", settings.admin_tls_cert, b"CERTIFICATE-----")
    key = _pem("admin_tls_key", settings.admin_tls_key, b"PRIVATE KEY-----")
    client_ca = (_pem("admin_client_ca", settings.admin_client_ca, b"CERTIFICATE-----")
                 if settings.admin_client_ca else None)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def load_admin_auth(settings: Settings) -> AdminAuth:
    """Reads the token file and TLS files (once; restart to reload). Raises ConfigError."""
    problem = admin_auth_problem(settings)
    if problem:
        raise ConfigError("admin_listen", problem)
    problem = admin_socket_mode_problem(settings)
    if problem:
        raise ConfigError("admin_unix_socket_mode", problem)
    tokens = load_tokens(settings.admin_token_file) if settings.admin_token_file else ()
    interceptors = (AdminAuthInterceptor(TokenChecker(tokens)),) if tokens else ()
    return AdminAuth(interceptors=interceptors, credentials=server_credentials(settings),
                     token_count=len(tokens), mtls=bool(settings.admin_client_ca))
