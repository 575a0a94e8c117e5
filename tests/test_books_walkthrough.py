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


def test_readme_codex_debt_and_cameo_steps(short_dir: str) -> None:  # noqa: F811
    """The README's walkthrough past the first purchase, command by command, as printed there: a
    codex task on included usage, one past its hold and the credits (draw, debt), the purchase
    that pays the debt, a video with a cameo, and the books' report of the debt and the royalty."""
    import grpc

    from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
    from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc

    data_dir = os.path.join(short_dir, "data")
    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=["--data-dir", data_dir]) as sc:
        with grpc.insecure_channel(sc.target) as channel:
            stub = pb_grpc.QuotaServiceStub(channel)
            for i in range(1, 31):
                stub.CheckAndReserve(pb.CheckAndReserveRequest(
                    account_id="alice", product="sora", reservation_id=f"job-{i}",
                    params=pb.JobParams(duration_seconds=10, resolution="720p")), timeout=10)
                stub.Commit(pb.CommitRequest(account_id="alice", reservation_id=f"job-{i}"), timeout=10)
        worker, admin = ["--target", sc.target], ["--target", sc.admin_target]
        _ok(cli("grant", "--account", "alice", "--pack", "pack_10", "--purchase-id", "order-1001", *admin))
        _ok(cli("reserve", "--account", "alice", "--product", "sora", "--duration", "15", "--resolution", "720p",
                "--id", "job-31", *worker))
        _ok(cli("commit", "--account", "alice", "--id", "job-31", "--duration", "8", "--resolution", "720p", *worker))
        estimate = ["--product", "codex", "--input-tokens", "80000", "--output-tokens", "5000"]

        out = _ok(cli("reserve", "--account", "alice", *estimate, "--id", "task-1", *worker))
        assert "  funded by included usage: 7 credit(s) of usage held until " in out, out
        assert "  included usage: five_hour (last 5 h) 7/10 credits, resets " in out, out
        assert "  job cost: 7 credit(s); credits available: 9\n" in out, out
        out = _ok(cli("commit", "--account", "alice", "--id", "task-1", "--input-tokens", "96000", "--output-tokens",
                      "8000", *worker))
        assert out == "COMMITTED  charged 0 credit(s), 9 credit(s) of included usage; refunded 0; " \
                      "credits available 9\n", out
        _ok(cli("reserve", "--account", "alice", *estimate, "--id", "task-2", *worker))
        out = _ok(cli("commit", "--account", "alice", "--id", "task-2", "--input-tokens", "120000",
                      "--output-tokens", "14000", *worker))
        assert out == "COMMITTED  charged 13 credit(s), 0 free unit(s); refunded 0; credits available 0; 2 drawn " \
                      "from the credits past the hold; 4 owed (debt)\n", out
        denied = cli("reserve", "--account", "alice", "--product", "sora", "--duration", "10", "--resolution",
                     "720p", "--id", "job-32", *worker)
        assert denied.returncode == 3 and denied.stdout.startswith(
            "DENIED   PURCHASE_REQUIRED: the account owes 4 credits (metered usage past its credits): no new job "
            "until credits pay it; 5 more credits needed with this job\n"
            "  offer: 1 x pack_10 (10 credits, USD 4.00) = USD 4.00\n"), denied.stdout
        out = _ok(cli("grant", "--account", "alice", "--pack", "pack_10", "--purchase-id", "order-1002", *admin))
        assert out.endswith("; credits available 6; 4 paid the account's debt\n"), out
        _ok(cli("set-cameo", "--cameo", "hero", "--owner", "studio", "--fee", "2", *admin))
        out = _ok(cli("reserve", "--account", "alice", "--product", "sora", "--duration", "10", "--resolution",
                      "720p", "--cameo", "hero", "--id", "job-32", *worker))
        assert "  job cost: 3 credit(s) (cameo fees 2); credits available: 3\n" in out, out
        out = _ok(cli("commit", "--account", "alice", "--id", "job-32", *worker))
        assert out == "COMMITTED  charged 3 credit(s), 0 free unit(s); refunded 0; credits available 3\n", out

        ledger = _ok(cli("ledger", "--account", "alice", *admin)).splitlines()[-6:]
        assert [line.split()[4] for line in ledger] == ["hold", "commit", "grant", "debt_repay", "hold", "commit"]
        assert ledger[1].endswith("(lots order-1001 7; drawn 2 from lots order-1001 2; owed +4)"), ledger
        assert ledger[3].endswith("(lots order-1002 4; owed -4)"), ledger
        assert ledger[5].endswith("(lots order-1002 3; royalty hero to studio 2)"), ledger

        wait_shipped(data_dir, "order-1002")
        _ok(cli("books", "ship", "--once", "--data-dir", data_dir))  # whatever the sidecar has not shipped yet
        month = datetime.now(timezone.utc).strftime("%Y-%m")
        report = _ok(cli("books", "report", "--month", month, "--data-dir", data_dir))
        for line in ("Debt opened                       4  (usage drawn past the lots)\n",
                     "Debt repaid                       4\n",
                     "  studio                          2\n",
                     "    hero                          2  in 1 use\n"):
            assert line in report, report
        audit = cli("audit", "--account", "alice", "--data-dir", data_dir)
        assert audit.returncode == 0, (audit.stdout, audit.stderr)
        assert sc.serve.terminate() == 0
