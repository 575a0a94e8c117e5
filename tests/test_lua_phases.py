"""benchmarks/lua_phases.py cuts the real scripts at named lines: each line must still be there, once."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lua_phases  # noqa: E402


def test_every_cut_is_a_line_of_its_script_and_inserts_one_early_return() -> None:
    for name, phases in lua_phases.PHASES.items():
        cut = lua_phases.variants(name)
        assert len(cut) == len(phases) + 1
        whole = cut[-1][1]
        for (phase, line), (label, source) in zip(phases, cut, strict=False):
            assert label == phase
            assert source.replace("do return '{}' end\n", "", 1) == whole
            assert "do return '{}' end\n" + line in source
