"""Only the prelude functions a script uses are prepended to it (storage/scripts.py: shake)."""

from __future__ import annotations

import re

import pytest
import redis.asyncio as aioredis
from quota_fixtures import has_functions

from quota_sidecar.storage import scripts

PRELUDE = """\
local K_A = KEYS[1]
local function clock() return 1 end
local now_ms = clock()
local function leaf(x) return x end
local function uses_leaf(x)
  if x then return leaf(x) end
  return 0
end
local function unused(x)
  return leaf(x) + 1
end
local function also_unused() return 2 end
"""


def _functions(source: str) -> set[str]:
    return set(re.findall(r"^local function (\w+)", source, re.MULTILINE))


def test_shake_keeps_what_the_script_and_the_prelude_statements_call_transitively() -> None:
    shaken = scripts.shake(PRELUDE, "return uses_leaf(now_ms)")
    # clock: called by a top-level statement; uses_leaf: by the script; leaf: by uses_leaf.
    assert _functions(shaken) == {"clock", "leaf", "uses_leaf"}
    assert "local K_A = KEYS[1]\n" in shaken and "local now_ms = clock()\n" in shaken
    assert "unused" not in shaken and "return 2" not in shaken


def test_shake_drops_nothing_a_script_names() -> None:
    assert scripts.shake(PRELUDE, "return unused(also_unused()) + uses_leaf(1)") == PRELUDE


def test_every_script_defines_each_prelude_function_it_names() -> None:
    prelude_functions = set(scripts._top_level_functions(
        scripts.resources.files("quota_sidecar.storage").joinpath("lua/_prelude.lua").read_text()))
    for name in scripts.SCRIPT_NAMES:
        source = scripts.load_script_source(name)
        defined = _functions(source)
        named = {f for f in prelude_functions if re.search(rf"\b{f}\b", source)}
        assert named <= defined, (name, named - defined)


async def test_every_shaken_script_compiles_in_redis(redis_client: aioredis.Redis) -> None:
    for name in scripts.SCRIPT_NAMES:
        assert len(await redis_client.script_load(scripts.load_script_source(name))) == 40


def test_the_library_registers_one_function_per_script_named_with_its_digest() -> None:
    library = scripts.library_source()
    digest = scripts.library_digest()
    assert library.startswith(f"#!lua name=quota_sidecar_{digest}\n") and len(digest) == 12
    registered = re.findall(r"redis\.register_function\('(\w+)'", library)
    assert registered == [f"qs_{name}_{digest}" for name in scripts.SCRIPT_NAMES]
    assert [scripts.function_name(name) for name in scripts.SCRIPT_NAMES] == registered
    # The prelude's helpers once, at library level; no redis.replicate_commands (a missing field
    # of `redis` raises in a Function); the EVALSHA forms start every call with begin() too.
    assert library.count("local function begin()") == 1 and "replicate_commands" not in library
    for name in scripts.SCRIPT_NAMES:
        source = scripts.load_script_source(name)
        assert source.startswith("if redis.replicate_commands then") and source.count("\nbegin()\n") == 1


async def test_the_library_loads_in_redis(redis_client: aioredis.Redis) -> None:
    # Loading compiles the whole library: Lua 5.1's 200 locals per function and 60 upvalues per
    # closure hold, and nothing at its top level calls Redis (FUNCTION LOAD refuses that).
    if not await has_functions(redis_client):
        pytest.skip("Redis 6.2 has no Functions")
    assert await redis_client.function_load(scripts.library_source(), replace=True) == scripts.library_name()
    [library] = await redis_client.function_list(library=scripts.library_name())
    functions = dict(zip(library[::2], library[1::2]))["functions"]
    assert sorted(dict(zip(f[::2], f[1::2]))["name"] for f in functions) == sorted(
        scripts.function_name(name) for name in scripts.SCRIPT_NAMES)
