"""How scripts reach Redis: one Transport interface, three implementations.

- MuxTransport: one multiplexed connection (quota_sidecar.storage.mux) to a plain single
  Redis: concurrent calls coalesced per event-loop tick, the cheapest path.
- PipelineTransport: redis-py pipelines, for TLS and Sentinel-managed masters (and for the
  EVALSHA + WAIT pairs of every single-server setup).
- ClusterTransport: one pipeline per master of a Redis Cluster, following MOVED / ASK.

Each sends one script call per decision, in the store's script mode (``functions``): FCALL of the
script's function in the library of every script (Redis >= 7), else EVALSHA by the script's SHA1
(Redis 6.2; storage/scripts.py has both forms). Each returns Redis' replies or errors as values,
in order; the store loads what the server lost (NOSCRIPT, or "Function not found", which the
transports report as NoScriptError: neither call ran) and sends again. Redis errors become
domain errors here (domain_error) and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster

from quota_sidecar.domain.errors import QuotaError, StoreUnavailable
from quota_sidecar.storage import connect as redis_connect
from quota_sidecar.storage import mux as redis_mux
from quota_sidecar.storage.keys import ScriptKeys

# One script call: (the script's function name in FCALL mode, else its SHA1; its KEYS; its ARGV).
Call = tuple[str, ScriptKeys, list[Any]]

# The lowest Redis version with Functions (FUNCTION LOAD, FCALL).
FUNCTIONS_SINCE = (7, 0)

# Redis replies that mean "not now" rather than "never".
_TRANSIENT_PREFIXES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM", "NOREPLICAS")
# redis-py strips the code of these replies from the message, so they are known by type.
_TRANSIENT_TYPES = (redis_errors.BusyLoadingError, redis_errors.ReadOnlyError, redis_errors.TryAgainError,
                    redis_errors.OutOfMemoryError,
                    # CLUSTERDOWN, MASTERDOWN, and redirections or TRYAGAIN past redis-py's limit
                    # ("TTL exhausted") while a slot moves or a replica is promoted.
                    redis_errors.ClusterError,
                    # No node serves the slot in redis-py's map (a failover in progress).
                    redis_errors.SlotNotCoveredError)
# Before the one retry of a batch whose connection dropped (a restarted Redis).
_RECONNECT_PAUSE_SECONDS = 0.01
_MAX_REDIRECTIONS = 5


# Redis < 7 runs a script on a replica and fails its first write with the error wrapped:
# "Error running script (call to f_...): @user_script:735: @user_script: 735: -READONLY You can't ...".
_WRAPPED_IN_SCRIPT = re.compile(r"@user_script: ?\d+: -([A-Z]+) ")


def _wrapped_code(text: str) -> str:
    """The error code a script error wraps ('' when none)."""
    wrapped = _WRAPPED_IN_SCRIPT.search(text)
    return wrapped.group(1) if wrapped else ""


def _missing_as_noscript(result: Any) -> Any:
    """An FCALL of a function Redis does not have ("ERR Function not found": a restart without
    persistence, FUNCTION FLUSH) as the NOSCRIPT of an EVALSHA: the call did not run, and the
    store handles both alike (load, send again)."""
    if (isinstance(result, redis_errors.ResponseError) and not isinstance(result, redis_errors.NoScriptError)
            and str(result).removeprefix("ERR ") == "Function not found"):
        return redis_errors.NoScriptError(str(result))
    return result


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(text))[:3])


def _redis_version(info: Any) -> tuple[int, ...]:
    """``redis_version`` of a parsed INFO server reply, or the lowest of a {node: reply} dict."""
    if "redis_version" in info:
        return _version(info["redis_version"])
    return min(_version(node_info["redis_version"]) for node_info in info.values())


def domain_error(exc: redis_errors.RedisError) -> QuotaError:
    """A Redis error as the domain knows it: StoreUnavailable when retrying can help."""
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return StoreUnavailable(f"redis unreachable: {exc}")
    text = str(exc)
    wrapped = _wrapped_code(text)
    if wrapped and wrapped.startswith(_TRANSIENT_PREFIXES):
        return StoreUnavailable(f"redis cannot answer now: {wrapped} {text}")
    if isinstance(exc, _TRANSIENT_TYPES) or text.startswith(_TRANSIENT_PREFIXES):
        code = getattr(exc, "status_code", None) or type(exc).__name__
        return StoreUnavailable(f"redis cannot answer now: {code} {text}")
    return QuotaError(f"redis error: {text}", reason="STORE_ERROR")


class Transport(Protocol):
    # True when ARGV must be flat (no pre-encoded redis_mux.Packed blocks).
    flat_args: bool
    # The store's script mode: FCALL and FUNCTION LOAD when True, else EVALSHA and SCRIPT LOAD.
    functions: bool

    async def send(self, calls: Sequence[Call]) -> list[Any]:
        """Every call as one FCALL (or EVALSHA), in one round trip (one per master on a cluster):
        each reply, or the Redis error it got, in order ("Function not found" as NoScriptError).
        Raises only when nothing could be sent."""

    async def load(self, source: str) -> None:
        """FUNCTION LOAD REPLACE of the library, or SCRIPT LOAD of one script (on every master of
        a cluster): after NOSCRIPT and at start-up."""

    async def server_version(self) -> tuple[int, ...]:
        """INFO server's redis_version (the lowest of a cluster's masters)."""

    async def read(self, *args: Any) -> Any:
        """One read-only command of one key (the outbox's XRANGE): its reply, raised on error.
        On the multiplexed connection concurrent reads leave together; else redis-py's, which
        parses the reply as its own command would (the store reads both shapes)."""

    async def send_and_wait(self, call: Call, source: str, min_replicas: int,
                            timeout_ms: int) -> tuple[Any, int]:
        """The call, then WAIT on the same connection: (reply, replicas that acknowledged).
        Raises the call's Redis error. One round trip."""

    async def close(self) -> None: ...


class PipelineTransport:
    """redis-py pipelines on a single Redis (plain, TLS or the master a Sentinel names)."""

    flat_args = True

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self.functions = False

    @property
    def verb(self) -> str:
        return "FCALL" if self.functions else "EVALSHA"

    async def send(self, calls: Sequence[Call]) -> list[Any]:
        verb = self.verb
        async with self._client.pipeline(transaction=False) as pipe:
            for ref, keys, args in calls:
                # Plain EVALSHA: redis-py's script-aware pipelines add a SCRIPT EXISTS round trip.
                pipe.execute_command(verb, ref, len(keys), *keys, *args)
            results = [_missing_as_noscript(r) for r in await pipe.execute(raise_on_error=False)]
        await self._forget_a_demoted_master(results)
        return results

    async def _forget_a_demoted_master(self, results: Sequence[Any]) -> None:
        """redis-py reconnects through the sentinels on READONLY, but Redis < 7 wraps a script's
        READONLY in a script error it does not recognise: drop the pooled connections so the
        next call asks the sentinels for the master again."""
        if any(isinstance(r, redis_errors.ResponseError) and _wrapped_code(str(r)) == "READONLY" for r in results):
            await self._client.connection_pool.disconnect()

    async def load(self, source: str) -> None:
        if self.functions:
            await self._client.execute_command("FUNCTION", "LOAD", "REPLACE", source)
        else:
            await self._client.script_load(source)

    async def server_version(self) -> tuple[int, ...]:
        return _redis_version(await self._client.info("server"))

    async def read(self, *args: Any) -> Any:
        return await self._client.execute_command(*args)

    async def send_and_wait(self, call: Call, source: str, min_replicas: int,
                            timeout_ms: int) -> tuple[Any, int]:
        ref, keys, args = call
        for _ in range(2):  # once more after loading a script the server lost
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.execute_command(self.verb, ref, len(keys), *keys, *args)
                pipe.wait(min_replicas, timeout_ms)
                raw, acked = await pipe.execute(raise_on_error=False)
            raw = _missing_as_noscript(raw)
            await self._forget_a_demoted_master([raw])
            if not isinstance(raw, redis_errors.NoScriptError):
                break
            await self.load(source)
        if isinstance(raw, Exception):
            raise raw
        if isinstance(acked, Exception):
            # "WAIT cannot be used with replica instances": the connection reached a master
            # demoted by a Sentinel failover. Transient, like the READONLY it stands for.
            raise redis_errors.ReadOnlyError(str(acked))
        return raw, int(acked)

    async def close(self) -> None:
        await redis_connect.close(self._client)


class MuxTransport:
    """The multiplexed connection (keys carry their encoding, ARGV may hold Packed blocks);
    WAIT pairs go through redis-py, on the connection WAIT must share with the script."""

    flat_args = False

    def __init__(self, mux: redis_mux.MuxConnection, client: aioredis.Redis) -> None:
        self._mux = mux
        self._pipelines = PipelineTransport(client)
        # "FCALL <function> <number of keys>" (or "EVALSHA <sha> ...") encoded once per script and key count.
        self._heads: dict[tuple[str, str, int], redis_mux.Packed] = {}

    @property
    def functions(self) -> bool:
        return self._pipelines.functions

    @functions.setter
    def functions(self, value: bool) -> None:
        self._pipelines.functions = value

    def _head(self, ref: str, keys: int) -> redis_mux.Packed:
        verb = self._pipelines.verb
        head = self._heads.get((verb, ref, keys))
        if head is None:
            head = self._heads[(verb, ref, keys)] = redis_mux.Packed([verb, ref, keys])
        return head

    async def send(self, calls: Sequence[Call]) -> list[Any]:
        # A dropped connection is retried once, as redis-py's client is configured to: every
        # script is idempotent, so re-sending one that did run is safe.
        packed = [redis_mux.pack_command([self._head(ref, len(keys)), keys.packed, *args]) for ref, keys, args in calls]
        try:
            results = await self._mux.execute_many(packed)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            await asyncio.sleep(_RECONNECT_PAUSE_SECONDS)
            results = await self._mux.execute_many(packed)
        return [_missing_as_noscript(r) for r in results] if self.functions else results

    async def load(self, source: str) -> None:
        if self.functions:
            await self._mux.execute("FUNCTION", "LOAD", "REPLACE", source)
        else:
            await self._mux.execute("SCRIPT", "LOAD", source)

    async def server_version(self) -> tuple[int, ...]:
        return await self._pipelines.server_version()

    async def read(self, *args: Any) -> Any:
        try:
            return await self._mux.execute(*args)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            await asyncio.sleep(_RECONNECT_PAUSE_SECONDS)
            return await self._mux.execute(*args)

    async def send_and_wait(self, call: Call, source: str, min_replicas: int,
                            timeout_ms: int) -> tuple[Any, int]:
        sha, keys, args = call
        return await self._pipelines.send_and_wait((sha, keys, redis_mux.flatten(args)), source, min_replicas,
                                                   timeout_ms)

    async def close(self) -> None:
        await self._mux.aclose()
        await self._pipelines.close()


def _slot_master(client: RedisCluster, key: str) -> ClusterNode:
    """The master serving ``key``'s slot in redis-py's current map."""
    node = client.get_node_from_key(key)
    if node is None:
        raise redis_errors.SlotNotCoveredError(f"no node serves the slot of {key} (a failover in progress?)")
    return node


class ClusterTransport:
    """One pipeline per master of a Redis Cluster.

    redis-py refuses EVALSHA in cluster pipelines and sends WAIT to a default node, so the
    calls are grouped by the master of their slot and sent on that node's connection. Calls
    redirected meanwhile (a slot moving: MOVED / ASK) run again one by one through the cluster
    client, which follows redirections.
    """

    flat_args = True

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self.functions = False

    @property
    def verb(self) -> str:
        return "FCALL" if self.functions else "EVALSHA"

    async def send(self, calls: Sequence[Call]) -> list[Any]:
        client = self._client
        await client.initialize()
        results: list[Any] = [None] * len(calls)
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, (_, keys, _) in enumerate(calls):
            node = _slot_master(client, keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(i)
        await asyncio.gather(*(self._on_node(node, indexes, calls, results) for node, indexes in by_node.values()))
        for i, result in enumerate(results):
            if isinstance(result, (redis_errors.MovedError, redis_errors.AskError)):
                ref, keys, args = calls[i]
                try:
                    results[i] = await client.execute_command(self.verb, ref, len(keys), *keys, *args)
                except redis_errors.RedisError as exc:
                    results[i] = _missing_as_noscript(exc)
        return results

    async def _on_node(self, node: ClusterNode, indexes: list[int], calls: Sequence[Call],
                       results: list[Any]) -> None:
        commands = [PipelineCommand(j, self.verb, calls[i][0], len(calls[i][1]), *calls[i][1], *calls[i][2])
                    for j, i in enumerate(indexes)]
        try:
            await node.execute_pipeline(commands)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            await self._refresh_slots()
            for i in indexes:
                results[i] = exc
            return
        for i, command in zip(indexes, commands):
            results[i] = _missing_as_noscript(command.result)

    async def _refresh_slots(self) -> None:
        # A failover? Re-read the slot map for the next call; redis-py's refresh marks
        # connections for reconnection rather than closing ones in use (aclose would).
        with contextlib.suppress(redis_errors.RedisError):
            await self._client.nodes_manager.initialize()

    async def load(self, source: str) -> None:
        if self.functions:
            # On every master, named explicitly: each master runs the calls of its own slots.
            await self._client.execute_command("FUNCTION", "LOAD", "REPLACE", source,
                                               target_nodes=RedisCluster.PRIMARIES)
        else:
            await self._client.script_load(source)

    async def server_version(self) -> tuple[int, ...]:
        return _redis_version(await self._client.execute_command("INFO", "server",
                                                                 target_nodes=RedisCluster.PRIMARIES))

    async def read(self, *args: Any) -> Any:
        return await self._client.execute_command(*args)  # routed by its key, following MOVED / ASK

    async def send_and_wait(self, call: Call, source: str, min_replicas: int,
                            timeout_ms: int) -> tuple[Any, int]:
        """FCALL (or EVALSHA) and WAIT pipelined on one connection to the master of the call's slot,
        following MOVED / ASK and reloading the script (NOSCRIPT) a bounded number of times."""
        client = self._client
        await client.initialize()
        ref, keys, args = call
        node, asking = _slot_master(client, keys[0]), False
        for _ in range(_MAX_REDIRECTIONS):
            commands = [PipelineCommand(0, "ASKING")] if asking else []
            commands += [PipelineCommand(len(commands), self.verb, ref, len(keys), *keys, *args),
                         PipelineCommand(len(commands) + 1, "WAIT", min_replicas, timeout_ms)]
            try:
                await node.execute_pipeline(commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                await self._refresh_slots()
                raise
            result, acked = _missing_as_noscript(commands[-2].result), commands[-1].result
            asking = False
            if isinstance(result, redis_errors.NoScriptError):
                if self.functions:
                    await node.execute_command("FUNCTION", "LOAD", "REPLACE", source)
                else:
                    await node.execute_command("SCRIPT", "LOAD", source)
            elif isinstance(result, redis_errors.MovedError):
                await client.nodes_manager.move_slot(result)
                node = _slot_master(client, keys[0])
            elif isinstance(result, redis_errors.AskError):
                node, asking = client.get_node(host=result.host, port=result.port) or node, True
            elif isinstance(result, Exception):
                raise result
            elif isinstance(acked, Exception):
                raise acked
            else:
                return result, int(acked)
        raise redis_errors.ClusterError("too many redirections running a script with WAIT")

    async def close(self) -> None:
        await redis_connect.close(self._client)


def transport_for(client: redis_connect.RedisClient, *, timeout_seconds: float, multiplex: bool) -> Transport:
    """The cheapest transport the client's Redis allows (see the module's docstring)."""
    if isinstance(client, RedisCluster):
        return ClusterTransport(client)
    mux = redis_mux.MuxConnection.for_client(client, timeout_seconds=timeout_seconds) if multiplex else None
    if mux is not None:
        return MuxTransport(mux, client)
    return PipelineTransport(client)
