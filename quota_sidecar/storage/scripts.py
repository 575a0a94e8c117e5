"""The Lua scripts (lua/): one file per atomic operation, with _prelude.lua (and _reserve.lua for the
reservation decision) in front, so each operation is still ONE script call. Two forms of the same
sources:

- a Redis Function library (``library_source``), for Redis >= 7: every script's file becomes the
  body of one registered function (``function_name``), called by FCALL;
- one script per operation (``load_script_source``), for Redis 6.2 (no Functions), called by
  EVALSHA of its SHA1.

Why a library: Redis runs an EVALSHA script's whole body on every call, so every ``local
function`` of the prelude built its closure (and walked Lua's open-upvalue list for each capture)
on every call, ~90k instructions before a script did anything (benchmarks/RESULTS.md, issue 18).
A library's top level runs once, at FUNCTION LOAD; FCALL runs only the registered callback.

Why this structure (library_source):

- The prelude's per-call state (the K_* key names, now_ms, the ARGV header, next_arg's cursor,
  the effects deferred by reserve_all) is declared as top-level locals and set by its
  ``begin()``: helpers defined once at library level then see each call's values. A function
  receives its KEYS and ARGV as arguments, not as globals, so the library declares ``local KEYS,
  ARGV`` first (the helpers that read ``ARGV[...]`` bind to them) and each callback sets them,
  then calls ``begin()``. The EVALSHA form calls ``begin()`` right after the prelude: the same
  code, so both forms behave alike.
- Nothing at library top level calls redis.call (Redis refuses it while loading), and
  ``redis.replicate_commands`` (effects replication, explicit for 6.2) is only touched by the
  EVALSHA form: in a Function, reading a missing field of ``redis`` raises.
- Lua 5.1 allows 200 locals per function and 60 upvalues per closure: the library's top level
  holds ~90 locals (every helper, once), and each callback captures only the top-level names
  its own file uses (reserve_all, the most, ~20). tests/test_scripts_shake.py loads the library
  in Redis, which compiles it against both limits.
- Names carry a digest of the generated sources (``quota_sidecar_<digest>``, ``qs_<name>_<digest>``),
  so sidecars of two code versions (a rolling deploy) each load and call their own library and
  never replace or delete the other's. Libraries of old versions stay until deleted
  (docs/operations.md).

Only the prelude's functions a script uses are prepended to its EVALSHA form (``shake``): there
every ``local function`` costs on every call. The library keeps every helper (defined once)."""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

SCRIPT_NAMES = ("reserve", "commit", "release", "extend", "grant", "revoke", "refund_job", "set_account",
                "balance", "sweep", "degraded", "reserve_all", "quote")


# Shared pieces prepended (after _prelude.lua) to the scripts that use them: reserve_all
# runs reserve's whole decision once per item, quote once as a dry run.
SCRIPT_LIBRARIES = {"reserve": ("_reserve",), "reserve_all": ("_reserve",), "quote": ("_reserve",)}

# A top-level function of the prelude: from its `local function` line to the `end` that closes it at
# column 0 (the prelude's style; `_top_level_functions` asserts every one is closed).
_FUNCTION_START = re.compile(r"^local function ([A-Za-z_][A-Za-z0-9_]*)\b", re.MULTILINE)


def _top_level_functions(source: str) -> dict[str, tuple[int, int]]:
    """name -> (start, end) character offsets of each top-level ``local function`` of ``source``."""
    spans: dict[str, tuple[int, int]] = {}
    for match in _FUNCTION_START.finditer(source):
        line_end = source.index("\n", match.start())
        first_line = source[match.start():line_end]
        if first_line.rstrip().endswith(" end") and "function" in first_line:  # a one-line function
            spans[match.group(1)] = (match.start(), line_end + 1)
            continue
        close = source.find("\nend\n", line_end)
        assert close != -1, f"unclosed top-level function {match.group(1)}"
        spans[match.group(1)] = (match.start(), close + len("\nend\n"))
    return spans


def shake(prelude: str, rest: str) -> str:
    """``prelude`` without the top-level functions nothing in ``rest`` (nor in what stays) calls."""
    spans = _top_level_functions(prelude)
    # The prelude's own top-level statements (not its functions) run on every call: roots too.
    statements, at = [], 0
    for start, end in sorted(spans.values()):
        statements.append(prelude[at:start])
        at = end
    statements.append(prelude[at:])
    kept: set[str] = set()
    pending = [rest, "".join(statements)]
    while pending:
        text = pending.pop()
        for name, (start, end) in spans.items():
            if name not in kept and re.search(rf"\b{name}\b", text):
                kept.add(name)
                pending.append(prelude[start:end])
    out: list[str] = []
    at = 0
    for name, (start, end) in sorted(spans.items(), key=lambda item: item[1][0]):
        if name not in kept:
            out.append(prelude[at:start])
            at = end
    out.append(prelude[at:])
    return "".join(out)


def _sources() -> tuple[str, dict[str, str]]:
    """The prelude, and each script's own part: its shared pieces (_reserve.lua) and its file."""
    lua = resources.files("quota_sidecar.storage").joinpath("lua")
    prelude = lua.joinpath("_prelude.lua").read_text(encoding="utf-8")
    return prelude, {name: lua.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in
                     {*SCRIPT_NAMES, *(piece for pieces in SCRIPT_LIBRARIES.values() for piece in pieces)}}


def _piece(name: str, text: str) -> str:
    return f"-- ==== {name}.lua ====\n" + text


# The EVALSHA form's first lines: scripts call TIME and then write; effects replication (the
# default since Redis 5, the only mode in 7) keeps replicas exact. Explicit for Redis 6.2.
_EVALSHA_HEAD = "if redis.replicate_commands then redis.replicate_commands() end\n"


@functools.cache
def load_script_source(name: str) -> str:
    """The EVALSHA form of script ``name``: shaken prelude, ``begin()``, its pieces, its file."""
    prelude, files = _sources()
    rest = "\n".join(_piece(piece, files[piece]) for piece in (*SCRIPT_LIBRARIES.get(name, ()), name))
    body = "begin()\n" + rest
    return _EVALSHA_HEAD + shake(prelude, body) + "\n" + body


LIBRARY_PREFIX = "quota_sidecar_"
FUNCTION_PREFIX = "qs_"
_DIGEST = "{digest}"  # stands for the digest in the library's template


@functools.cache
def _library_template() -> str:
    prelude, files = _sources()
    shared = sorted({piece for pieces in SCRIPT_LIBRARIES.values() for piece in pieces})
    parts = [f"#!lua name={LIBRARY_PREFIX}{_DIGEST}\n",
             "-- Generated by quota_sidecar/storage/scripts.py (see its docstring): one library per code version.\n",
             "local KEYS, ARGV  -- this call's, set by each function below before begin()\n",
             prelude,
             *(_piece(piece, files[piece]) + "\n" for piece in shared)]
    for name in SCRIPT_NAMES:
        parts.append(f"redis.register_function('{FUNCTION_PREFIX}{name}_{_DIGEST}', function(keys, args)\n"
                     "KEYS, ARGV = keys, args\n"
                     "begin()\n"
                     f"{_piece(name, files[name])}\n"
                     "end)\n")
    return "".join(parts)


@functools.cache
def library_digest() -> str:
    """First 12 hex digits of the SHA1 of the generated library (every script's source in it)."""
    return hashlib.sha1(_library_template().encode()).hexdigest()[:12]


def library_name() -> str:
    return LIBRARY_PREFIX + library_digest()


def function_name(name: str) -> str:
    """The library function that runs script ``name`` (FCALL's first argument)."""
    return f"{FUNCTION_PREFIX}{name}_{library_digest()}"


@functools.cache
def library_source() -> str:
    """The Redis Function library of every script (FUNCTION LOAD REPLACE's argument)."""
    return _library_template().replace(_DIGEST, library_digest())
