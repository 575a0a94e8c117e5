"""The README's books, end to end: the development ``serve`` (embedded Redis and embedded books, no URL
given), the CLI's grant with a pack, a job, then ``ledger``, ``books purchases``, ``books report`` and
``audit`` finding everything through the data folder, as a newcomer runs them."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import pytest
from test_serve_cli import _ok, cli, running_sidecar, short_dir  # noqa: F401 - short_dir is a fixture

pytestmark = pytest.mark.slow

SHIPPED_WITHIN_SECONDS = 30.0


def wait_shipped(data_dir: str, purchase_id: str) -> str:
    """Polls `books purchases` until the purchase is in the books (bounded); returns its output."""
    deadline = time.monotonic() + SHIPPED_WITHIN_SECONDS
    while True:
        r = cli("books", "purchases", "--purchase-id", purchase_id, "--data-dir", data_dir)
        if r.returncode == 0:
            return r.stdout
        assert r.returncode == 1 and "MISSING" in r.stdout, (r.returncode, r.stdout, r.stderr)
        assert time.monotonic() < deadline, f"{purchase_id} not shipped within {SHIPPED_WITHIN_SECONDS} s"
        time.sleep(0.1)


def test_the_development_sidecar_keeps_its_books(short_dir: str) -> None:  # noqa: F811
    data_dir = os.path.join(short_dir, "data")
    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=["--data-dir", data_dir]) as sc:
        assert os.path.exists(os.path.join(data_dir, "books.url"))
        out = _ok(cli("grant", "--account", "alice", "--pack", "pack_10", "--purchase-id", "order-1001",
                      "--target", sc.admin_target))
        assert out.startswith("GRANTED  lot order-1001: 10 credit(s)"), out
        _ok(cli("reserve", "--account", "alice", "--product", "sora", "--duration", "10", "--resolution", "720p",
                "--id", "job-1", "--target", sc.target))
        _ok(cli("commit", "--account", "alice", "--id", "job-1", "--target", sc.target))

        purchases = wait_shipped(data_dir, "order-1001")
        assert "order-1001" in purchases and "alice" in purchases, purchases

        month = datetime.now(timezone.utc).strftime("%Y-%m")
        report = json.loads(_ok(cli("books", "report", "--month", month, "--json", "--data-dir", data_dir)))
        text = json.dumps(report)
        assert '"USD"' in text and "400" in text, report  # pack_10: USD 4.00 = 400 minor units

        ledger = _ok(cli("ledger", "--account", "alice", "--target", sc.admin_target))
        kinds = [line.split()[4] for line in ledger.splitlines() if line.strip()]
        assert kinds[:3] == ["grant", "hold", "commit"], ledger

        audit = cli("audit", "--account", "alice", "--data-dir", data_dir)
        assert audit.returncode == 0, (audit.stdout, audit.stderr)

        assert sc.serve.terminate() == 0
    assert not os.path.exists(os.path.join(data_dir, "books.url"))  # withdrawn at the stop
