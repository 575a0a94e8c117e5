"""The `quota-sidecar` console script: the command line, or a clear word when the install is the
client library alone (the base package) and a verb needs the server extra."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from quota_sidecar.tools.cli import main as cli_main

        return cli_main()
    except ModuleNotFoundError as exc:
        # The verbs import what they need when they run: a client-only install fails here.
        print(f"quota-sidecar: this needs the server extra ({exc.name} is not installed): "
              "pip install 'quota-sidecar[server]'", file=sys.stderr)
        return 2
