"""quota-sidecar command line: ``serve`` and human verbs against a running sidecar.

    quota-sidecar serve [--listen ADDR ...] [--redis-url URL] [--plans FILE] [--admin-listen ADDR ...]
    quota-sidecar reserve --account A --product sora --duration 10 --resolution 720p
    quota-sidecar quote   --account A --product sora --duration 10 --resolution 720p   (nothing held)
    quota-sidecar commit  --account A --id RID [--duration 8 --resolution 720p]
    quota-sidecar release --account A --id RID
    quota-sidecar extend  --account A --id RID [--ttl 600]
    quota-sidecar balance --account A
    quota-sidecar grant   --account A --credits 10 --purchase-id P     (admin address)
    quota-sidecar set-account --account A [--plan pro] [--tz Europe/Paris] [--monthly-cap 100]  (admin address)
    quota-sidecar revoke  --account A --purchase-id P                   (admin address)
    quota-sidecar refund  --account A --id RID                          (admin address)
    quota-sidecar account --account A / ledger --account A              (admin address)
    quota-sidecar audit   (--account A | --all) [--redis-url URL]
    quota-sidecar books migrate | ship [--once] | report --month YYYY-MM | purchases | jobs   (the books)
    quota-sidecar check-plans FILE
    quota-sidecar loadtest [--concurrency N | --rate R] [--duration S | --requests N] [--plot FILE] ...

Client verbs print readable text, or the response as JSON with --json; a gRPC
error prints its code, message and details and exits 1. Admin verbs also take
--token-file / QUOTA_ADMIN_TOKEN (bearer token) and --tls-ca/--tls-cert/--tls-key.
Exit statuses: EXIT_STATUS_TEXT below (also the top-level --help epilog).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any, Sequence

from quota_sidecar.domain.errors import PlansError, QuotaError
from quota_sidecar.server.settings import Settings, env_name
from quota_sidecar.tools.books import add_parser as books_parser
from quota_sidecar.tools.common import (
    ADMIN_TOKEN_ENV,
    DEFAULT_ADMIN_TARGET,
    DEFAULT_TARGET,
    EXIT_BROKEN_PIPE,
    EXIT_DENIED,
    EXIT_STATUS_TEXT,
    EXIT_USAGE,
    redis_flags,
)


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the sidecar", description=(
        "Run the quota sidecar. Every flag can also be set with its QUOTA_* environment variable; "
        "flags win. Without --redis-url an embedded redis-server is started (development only)."))
    for f in fields(Settings):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        help_text = f"{meta['help']} [env {env_name(f.name)}; default: {shown!s}]"
        kind = type(f.default) if not isinstance(f.default, tuple) else str
        if meta.get("repeat"):
            p.add_argument(flag, dest=f.name, action="append", metavar=meta["metavar"], help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=kind, metavar=meta["metavar"] or None, help=help_text)


def _target(p: argparse.ArgumentParser, *, admin: bool) -> None:
    var = "QUOTA_ADMIN_TARGET" if admin else "QUOTA_TARGET"
    what = "the sidecar's --admin-listen address" if admin else "the sidecar's --listen address"
    default = DEFAULT_ADMIN_TARGET if admin else DEFAULT_TARGET
    p.add_argument("--target", default=None, help=f"{what} (env {var}; default {default})")
    p.add_argument("--json", action="store_true", help=(
        "print the response as JSON: proto field names, every field (zero values too), times as RFC 3339 UTC "
        "strings, and 64-bit integers as JSON numbers (protobuf's own JSON mapping would quote them)"))
    if admin:
        _admin_credentials(p)


def _admin_credentials(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, metavar="FILE", help=(
        "file whose first line that is neither blank nor a # comment is the admin bearer token, sent as "
        f"'authorization: Bearer <token>' (default: the token in env {ADMIN_TOKEN_ENV}, if set)"))
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="PEM CA that signed the sidecar's admin certificate; connects with TLS")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="PEM client certificate for mTLS (with --tls-key and --tls-ca)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default=None, metavar="NAME", help=(
        "name the sidecar's certificate must carry (default: the target's host; needed with unix: targets)"))


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="video length in seconds (sora)")
    p.add_argument("--resolution", default=None, help="e.g. 720p or 1080p (sora)")
    p.add_argument("--model", default=None, help="model name; default: the product's default model")
    p.add_argument("--units", type=int, default=None, help="number of tasks (codex)")
    for flag, what in (("--input-tokens", "input"), ("--cached-input-tokens", "cached input"),
                       ("--output-tokens", "output")):
        p.add_argument(flag, type=int, default=None, help=(
            f"{what} tokens of a metered product: the estimate at reserve/quote, the actual usage at commit"))
    p.add_argument("--fast", action="store_true", default=None, help="a metered product's fast mode")


def _reserve_args(p: argparse.ArgumentParser, id_help: str) -> None:
    """reserve's flags (quote takes the same)."""
    p.add_argument("--account", required=True)
    p.add_argument("--product", required=True, help="sora or codex (or a product of your plans file)")
    p.add_argument("--id", default="", help=id_help)
    p.add_argument("--ttl", type=int, default=0, help="hold lifetime in seconds; 0 = the product's default")
    _job_args(p)
    p.add_argument("--cameo", action="append", default=None, metavar="ID", dest="cameo",
                   help="a cameo the job uses (repeatable, at most 8): its fee is added, paid from credits")
    _target(p, admin=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quota-sidecar", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=(
        "Quota and entitlement sidecar for AI generation workers: free daily allowances and credits,\n"
        "reserved before a job and committed or released after it."), epilog=EXIT_STATUS_TEXT)
    sub = parser.add_subparsers(dest="verb", required=True)
    _serve_parser(sub)

    p = sub.add_parser("reserve", help="CheckAndReserve a job", description=(
        "CheckAndReserve a job. Exit status: 0 ALLOWED (commit or release the hold), "
        f"{EXIT_DENIED} DENIED (nothing held; the reason and any purchase offer are printed), 1 the call "
        "failed, 2 bad usage; so `quota-sidecar reserve ... && render` renders only an allowed job."))
    _reserve_args(p, "reservation id (idempotency key); default: the server makes one")

    p = sub.add_parser("quote", help="Quote a job: what reserve would answer now, holding nothing", description=(
        "Quote a job: what `reserve` with the same flags would answer now (its price, funding, limits and any "
        "purchase offer), without holding anything. Exit status: 0 would be allowed, "
        f"{EXIT_DENIED} would be denied, 1 the call failed, 2 bad usage."))
    _reserve_args(p, "quote a retry of this reservation id (a live hold replays); default: a new job")

    p = sub.add_parser("commit", help="Commit a reservation (optionally at its actual, smaller size)")
    p.add_argument("--account", required=True)
    p.add_argument("--id", required=True, help="reservation id")
    _job_args(p)
    _target(p, admin=False)

    for verb, text in (("release", "Release a reservation (refund the hold)"), ("extend", "Extend a hold")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--account", required=True)
        p.add_argument("--id", required=True, help="reservation id")
        if verb == "extend":
            p.add_argument("--ttl", type=int, default=0, help="new lifetime from now, seconds; 0 = the original")
        _target(p, admin=False)

    p = sub.add_parser("balance", help="show an account's plan, free allowances, credits and holds")
    p.add_argument("--account", required=True)
    _target(p, admin=False)

    p = sub.add_parser("grant", help="GrantCredits (admin address)")
    p.add_argument("--account", required=True)
    p.add_argument("--credits", type=int, default=0, help="credits of the lot (with --pack: 0 = the pack's)")
    p.add_argument("--purchase-id", required=True, help="the purchase's id; idempotency key")
    p.add_argument("--pack", default="", metavar="PACK", help="the credit pack bought (its credits and price)")
    p.add_argument("--price", default=None, metavar="AMOUNT",
                   help="what the buyer paid, e.g. 4.00 (with --currency); kept in the books for finance")
    p.add_argument("--currency", default="", metavar="CODE", help="ISO 4217 code of --price, e.g. USD")
    p.add_argument("--expires-at", default=None, help="ISO 8601 time; default: 12 months from now")
    p.add_argument("--source", choices=("purchase", "promo", "refund", "compensation"), default="purchase",
                   help="where the credits come from; at equal expiry promo credits are spent first")
    p.add_argument("--reason", default="", help="kept in the ledger, e.g. the payment reference")
    _target(p, admin=True)

    p = sub.add_parser("revoke", help="RevokeCredits: chargeback of a purchase (admin address)")
    p.add_argument("--account", required=True)
    p.add_argument("--purchase-id", required=True)
    p.add_argument("--reason", default="", help="kept in the ledger")
    _target(p, admin=True)

    p = sub.add_parser("refund", help="RefundJob: give back what a committed job cost (admin address)")
    p.add_argument("--account", required=True)
    p.add_argument("--id", required=True, help="reservation id of the committed job")
    p.add_argument("--reason", default="", help="kept in the ledger")
    _target(p, admin=True)

    p = sub.add_parser("set-account", help="SetAccount plan, time zone, spend cap, auto top-up (admin address)")
    p.add_argument("--account", required=True)
    p.add_argument("--plan", default="")
    p.add_argument("--tz", default="", help="IANA time zone, e.g. Europe/Paris")
    p.add_argument("--monthly-cap", type=int, default=None, help="credits per calendar month; 0 = no cap")
    p.add_argument("--auto-topup-pack", default="", help="opt in to auto top-up with this pack")
    p.add_argument("--auto-topup-threshold", type=int, default=0, help="credits below which top-up is requested")
    p.add_argument("--no-auto-topup", action="store_true", help="opt out of auto top-up")
    _target(p, admin=True)

    p = sub.add_parser("set-cameo", help="SetCameo: define or change a cameo and its fee (admin address)")
    p.add_argument("--cameo", required=True, metavar="ID")
    p.add_argument("--owner", required=True, metavar="ACCOUNT", help="the rights-holder's account id")
    p.add_argument("--fee", type=int, required=True, help="credits each job using the cameo pays its owner")
    p.add_argument("--inactive", action="store_true", help="refuse jobs using it (NOT_ENTITLED)")
    _target(p, admin=True)

    p = sub.add_parser("cameo", help="GetCameo: a cameo's owner, fee and state (admin address)")
    p.add_argument("--cameo", required=True, metavar="ID")
    _target(p, admin=True)

    for verb, text in (("account", "GetAccount: everything about an account (admin address)"),
                       ("ledger", "ListLedger: the account's movements, oldest first (admin address)")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--account", required=True)
        if verb == "ledger":
            p.add_argument("--page-size", type=int, default=100, help="1 to 1000")
            p.add_argument("--page-token", default="", help="from the previous page's 'more:' line")
            p.add_argument("--tz", default=None, metavar="ZONE", help=(
                "IANA time zone the times are printed in, e.g. UTC [default: the account's zone, as balance "
                "prints it; one more call, GetAccount]"))
        _target(p, admin=True)

    p = sub.add_parser("audit", help="check conservation of every movement in Redis and the books; exit 1 on a "
                       "violation", description=(
        "Check the conservation of every credit and free-unit movement (read only): the books plus the "
        "unshipped outbox must explain Redis' credits and free units exactly, each account's movements be "
        "numbered 1, 2, 3, ... with no gap, and every purchase in the books have its lot. Exit status: "
        "0 clean, 1 violations found (the report says which), 2 could not run (bad flags, no Redis URL, "
        "Redis unreachable; one line on stderr)."))
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", help="one account")
    who.add_argument("--all", action="store_true", help="every account in Redis")
    redis_flags(p, "the Redis the sidecars use (read only)")
    p.add_argument("--books-url", default=None, metavar="URL", help=(
        "the books (PostgreSQL, read only): the movements already shipped are checked with Redis [env "
        "QUOTA_BOOKS_URL; default: the URL a development `serve` keeps in <data dir>/books.url; none: Redis "
        "and its unshipped outbox only]"))

    p = sub.add_parser("check-plans", help="validate a plans file and print a summary")
    p.add_argument("file")
    _loadtest_parser(sub)
    books_parser(sub)
    return parser


def _loadtest_parser(sub: Any) -> None:
    p = sub.add_parser("loadtest", help="load-test a running sidecar and report latency and throughput", description=(
        "Drive a running sidecar's worker API with CheckAndReserve decisions and their follow-ups "
        "(commit, release, extend, or abandon) and report throughput, latency percentiles (HDR histogram), "
        "statuses, denials and fundings. Closed loop by default (--concurrency callers, one job in flight each); "
        "--rate is an open loop that measures latency from each call's intended send time (corrects for "
        "coordinated omission). Exit 0 on success, 1 when a call failed with any status but OK (unless "
        "--allow-errors), the --audit found a violation or could not reach Redis, or the target could not be "
        "reached; 2 on bad flags."))
    p.add_argument("--target", default=None, metavar="ADDR", help=(
        f"the sidecar's --listen address, host:port or unix:/path [env QUOTA_TARGET; default: {DEFAULT_TARGET}]"))
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=16, metavar="N", help=(
        "closed loop: N callers, each with one job (reserve + follow-up) in flight [default: 16]"))
    loop.add_argument("--rate", type=float, default=0.0, metavar="R", help=(
        "open loop: R decisions per second on a fixed schedule (with --batch, R/K batches per second), "
        "latency measured from the intended send time [default: 0 = closed loop]"))
    p.add_argument("--max-inflight", type=int, default=10000, metavar="N", help=(
        "open loop: most jobs in flight; a scheduled decision that finds them all busy is dropped and "
        "counted [default: 10000]"))
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, default=None, metavar="S",
                      help="measure for S seconds after the warm-up [default: 10]")
    stop.add_argument("--requests", type=int, default=0, metavar="N", help=(
        "stop after N measured decisions instead (open loop: N scheduled, sent or dropped) [default: 0 = "
        "use --duration]"))
    p.add_argument("--warmup", type=float, default=1.0, metavar="S",
                   help="calls started in the first S seconds are made but not recorded [default: 1]")
    p.add_argument("--accounts", type=int, default=1000, metavar="N",
                   help="accounts PREFIX-0 .. PREFIX-(N-1) the decisions are spread over [default: 1000]")
    p.add_argument("--account-prefix", default="lt", metavar="PREFIX", help="account ids are PREFIX-<i> [default: lt]")
    p.add_argument("--zipf", type=float, default=0.0, metavar="S", help=(
        "Zipf exponent of the account draw: account i has weight 1/(i+1)^S, so PREFIX-0 is the hottest "
        "[default: 0 = uniform]"))
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the account, job and follow-up draws; same seed, same sequence [default: 0]")
    p.add_argument("--product", default="sora", metavar="NAME", help="the product every job asks for [default: sora]")
    p.add_argument("--job", action="append", default=None, metavar="SPEC", help=(
        "a job size of the mix, repeatable: key=value pairs of duration, resolution, model, units, input_tokens, "
        "output_tokens, weight (e.g. duration=10,resolution=720p,weight=2), or a built-in mix by product kind: "
        "video (5/10/15 s at 480p/720p), task (1..5 units) or metered (codex-mini estimates of 1..5 credits) "
        "[default: the product's built-in mix: sora video, codex metered]"))
    p.add_argument("--mix", default="commit=0.8,release=0.1,abandon=0.05,extend=0.05", metavar="SPEC", help=(
        "follow-up weights of an allowed reservation: commit, release, abandon (nothing; the hold expires "
        "by its TTL), extend (ExtendReservation, then Commit) [default: commit=0.8,release=0.1,abandon=0.05,"
        "extend=0.05]"))
    p.add_argument("--ttl", type=int, default=0, metavar="S",
                   help="hold lifetime in seconds, 1 to 86400 [default: 0 = the product's default]")
    p.add_argument("--batch", type=int, default=0, metavar="K", help=(
        "K decisions per CheckAndReserveBatch, follow-ups by CommitBatch/ReleaseBatch [default: 0 = single "
        "calls]"))
    p.add_argument("--max-batch-items", type=int, default=100, metavar="N",
                   help="the sidecar's --max-batch-items; --batch may not exceed it [default: 100]")
    p.add_argument("--channels", type=int, default=1, metavar="N",
                   help="gRPC channels (connections) the calls are spread over [default: 1]")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="deadline of every call, seconds [default: 5]")
    p.add_argument("--admin-target", default=None, metavar="ADDR", help=(
        "the sidecar's --admin-listen address, for --credits-per-account [env QUOTA_ADMIN_TARGET; default: "
        f"{DEFAULT_ADMIN_TARGET}]"))
    p.add_argument("--credits-per-account", type=int, default=0, metavar="N", help=(
        "before the run, GrantCredits N to every account with purchase id loadtest-N-<account>, so a "
        "re-run does not grant again [default: 0 = no grants]"))
    _admin_credentials(p)
    p.add_argument("--audit", action="store_true", help=(
        "after the run, run the conservation audit (as `audit`) over every account the run reserved for or "
        "granted credits to (needs the sidecar's Redis: --redis-url, QUOTA_REDIS_URL or a development "
        "sidecar's redis.url); exit 1 on a violation"))
    redis_flags(p, "the Redis the sidecar uses, for --audit (read only)")
    p.add_argument("--plot", default=None, metavar="FILE", help=(
        "write a latency plot: a self-contained HTML file (percentile curve, throughput and p99 per second), "
        "or a PNG when FILE ends in .png and matplotlib is installed"))
    p.add_argument("--json", action="store_true", help="print the report as JSON (shape: quota_sidecar/loadtest.py)")
    p.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    p.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even when calls failed (they are still counted and reported)")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. A reader that stops early (`ledger | head`) ends the output quietly, with
    EXIT_BROKEN_PIPE, instead of a BrokenPipeError traceback."""
    try:
        try:
            return _main(argv)
        finally:
            # Inside the try: buffered output meets a closed pipe here at the latest, not at exit
            # (where Python could only print "Exception ignored ... BrokenPipeError").
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    """What is still buffered must go somewhere when Python flushes at exit: devnull, not the closed pipe.
    (The Python documentation's recipe; SIGPIPE's default action is not restored instead, because it
    would also kill the process on a write to a closed gRPC or Redis socket.)"""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (a test's capture): nothing to flush at exit
        pass


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "check-plans":
        return _check_plans(args.file)
    if args.verb == "audit":
        from quota_sidecar.tools.audit import cli_main as audit_cli

        return audit_cli(args)
    if args.verb == "loadtest":
        from quota_sidecar.tools.loadtest import cli_main

        return cli_main(args)
    if args.verb == "books":
        from quota_sidecar.tools.books import cli_main as books_cli

        return books_cli(args)
    from quota_sidecar.tools import cli_client  # grpc client code only when a client verb runs

    return cli_client.run_verb(args)


def _serve(args: argparse.Namespace) -> int:
    from quota_sidecar.server.app import freeze_startup_heap, run, run_until_complete
    from quota_sidecar.server.data_dir import DataDirInUse
    from quota_sidecar.server.logs import configure as configure_logging
    from quota_sidecar.server.logs import mask_credentials
    from quota_sidecar.server.workers import WORKER_ENV, decode_worker, supervise

    worker: int | None = None
    try:
        if os.environ.get(WORKER_ENV):
            # A worker of `serve --workers N`: the supervisor resolved the settings for it.
            worker, settings = decode_worker(os.environ[WORKER_ENV])
        else:
            settings = Settings.from_sources({f.name: getattr(args, f.name) for f in fields(Settings)})
    except QuotaError as exc:
        print(f"quota-sidecar: bad setting: {mask_credentials(exc.message)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, worker)
    try:
        if settings.workers > 1:
            return supervise(settings)
        run_until_complete(run(settings, worker=worker, on_ready=freeze_startup_heap), settings.event_loop)
    except PlansError as exc:
        print(f"quota-sidecar: invalid plans file: {exc.message}", file=sys.stderr)
        return 2
    except DataDirInUse as exc:
        # Refused before anything started: nothing to stop, and a flag (--data-dir) is the fix.
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (QuotaError, RuntimeError, OSError) as exc:
        # Start-up failures (Redis unreachable, no redis-server binary, address in use): say what, not a traceback.
        print(f"quota-sidecar: cannot start: {mask_credentials(str(exc))}", file=sys.stderr)
        return 1
    return 0


def _check_plans(path: str) -> int:
    # The loader `serve --plans` uses: the plans file models, whose JSON Schema editors use.
    from quota_sidecar.server.plans_file import load_plans, schema_location

    try:
        plans = load_plans(path)
    except PlansError as exc:
        print(f"invalid: {exc.message}", file=sys.stderr)
        return 1
    print(f"ok: plans version {plans.version}; plans {', '.join(plans.plans)}; "
          f"products {', '.join(plans.products)}; packs {', '.join(p.pack_id for p in plans.packs)}")
    print(f"validated as `serve --plans` validates it (the plans file models); "
          f"their JSON Schema, for editors: {schema_location()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
