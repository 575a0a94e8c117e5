"""The Lua scripts (lua/): one file per atomic operation, with _prelude.lua (and _reserve.lua for the
reservation decision) prepended when registered, so each operation is still ONE script."""

from __future__ import annotations

from importlib import resources

SCRIPT_NAMES = ("reserve", "commit", "release", "extend", "grant", "revoke", "refund_job", "set_account",
                "balance", "sweep", "degraded", "reserve_all", "quote")


# Shared pieces prepended (after _prelude.lua) to the scripts that use them: reserve_all
# runs reserve's whole decision once per item, quote once as a dry run.
SCRIPT_LIBRARIES = {"reserve": ("_reserve",), "reserve_all": ("_reserve",), "quote": ("_reserve",)}


def load_script_source(name: str) -> str:
    lua = resources.files("quota_sidecar.storage").joinpath("lua")
    parts = [lua.joinpath("_prelude.lua").read_text(encoding="utf-8")]
    for piece in (*SCRIPT_LIBRARIES.get(name, ()), name):
        parts.append(f"-- ==== {piece}.lua ====\n" + lua.joinpath(f"{piece}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)
