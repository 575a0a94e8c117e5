"""docs/configuration.md, generated from the Settings fields.

    python -m quota_sidecar.tools.config_reference > docs/configuration.md
    python -m quota_sidecar.tools.config_reference --write     # the same, into the repository's docs/
    python -m quota_sidecar.tools.config_reference --check     # exit 1 when docs/configuration.md is stale

Every ``serve`` setting is declared once, in quota_sidecar.server.settings
(``_setting(default, help, metavar)``); ``serve --help`` (quota_sidecar.tools.cli)
and this reference are both built from those fields and their metadata, so the
two cannot disagree. tests/test_docs.py fails when the checked-in file differs
from ``render()``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from quota_sidecar.server.settings import Settings, env_name

COMMAND = "python -m quota_sidecar.tools.config_reference --write"
# The repository's docs/ folder, next to the package (an editable install or a clone).
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_HEADER = f"""\
# Configuration reference

<!-- Generated from the fields of quota_sidecar/server/settings.py by `{COMMAND}`.
     Do not edit by hand: change the field's help text and regenerate (tests/test_docs.py checks). -->

`quota-sidecar serve` reads every setting from a flag or from its `QUOTA_*` environment variable;
a flag wins over the variable, the variable over the default. A repeatable flag's variable takes a
comma-separated list; a `BOOL` setting reads `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`).
`quota-sidecar serve --help` prints the same text. How the settings play together in production
(workers, shutdown, Redis) is in [operations.md](operations.md); the admin API's security
settings in [api.md](api.md#securing-the-admin-api).

| flag | env var | default | description |
|---|---|---|---|
"""


def flag_name(f: Field[Any]) -> str:
    """The ``serve`` flag of a Settings field, as quota_sidecar.tools.cli declares it."""
    return "--" + f.name.replace("_", "-")


def _default(f: Field[Any]) -> str:
    value = f.default
    if isinstance(value, tuple):
        return "`" + ",".join(value) + "`" if value else "*(none)*"
    if value == "":
        return "*(empty)*"
    return f"`{value}`"


def _cell(text: str) -> str:
    # Table cells: a pipe would end the cell, an asterisk could start emphasis (OTEL_EXPORTER_OTLP_*).
    for char in "\\|*<":
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def _row(f: Field[Any]) -> str:
    meta = f.metadata
    flag = flag_name(f)
    if meta["metavar"]:
        flag += f" {meta['metavar']}"
    flag = f"`{flag}`"
    if meta.get("repeat"):
        flag += " (repeatable)"
    return f"| {flag} | `{env_name(f.name)}` | {_default(f)} | {_cell(meta['help'])} |"


def render() -> str:
    """The whole of docs/configuration.md."""
    return _HEADER + "".join(_row(f) + "\n" for f in fields(Settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quota_sidecar.tools.config_reference",
        description="Print docs/configuration.md, generated from the Settings fields.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help=f"write it to {DEFAULT_PATH} instead of printing it")
    what.add_argument("--check", action="store_true", help="exit 1 when that file differs from the generated text")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DEFAULT_PATH.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_PATH.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = DEFAULT_PATH.read_text(encoding="utf-8") if DEFAULT_PATH.is_file() else ""
        if current != text:
            print(f"{DEFAULT_PATH} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
