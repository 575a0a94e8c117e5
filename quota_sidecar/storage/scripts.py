"""The Lua scripts (lua/): one file per atomic operation, with _prelude.lua (and _reserve.lua for the
reservation decision) prepended when registered, so each operation is still ONE script.

Only the prelude's functions a script uses are prepended (`shake`): Redis runs a script's whole body
on every EVALSHA, so every ``local function`` of the prelude builds a closure (and walks the open
upvalues it captures) on every call, used or not; the prelude's ~60 functions cost ~70k instructions
per call before a script did anything (benchmarks/RESULTS.md, issue 18)."""

from __future__ import annotations

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


def load_script_source(name: str) -> str:
    lua = resources.files("quota_sidecar.storage").joinpath("lua")
    prelude = lua.joinpath("_prelude.lua").read_text(encoding="utf-8")
    parts = []
    for piece in (*SCRIPT_LIBRARIES.get(name, ()), name):
        parts.append(f"-- ==== {piece}.lua ====\n" + lua.joinpath(f"{piece}.lua").read_text(encoding="utf-8"))
    rest = "\n".join(parts)
    return shake(prelude, rest) + "\n" + rest
