"""Tests of the plans: loading and strict validation (quota_sidecar.server.plans_file), its JSON
Schema, and pricing and entitlements (quota_sidecar.domain.plans)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from quota_fixtures import per_task_document, per_task_plans

from quota_sidecar.domain.errors import InvalidArgument, PlansError
from quota_sidecar.domain.model import CreditPack, JobParams, Limit, LimitKind, Money, Offer
from quota_sidecar.domain.plans import Plans, ProductRules
from quota_sidecar.server.plans_file import load_plans, parse_plans, plans_json_schema, plans_json_schema_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plans() -> Plans:
    """The packaged plans with codex priced per task (the documented alternative, docs/plans.md):
    what the pricing, entitlement and refusal tests of a task product below are written for.
    The packaged (metered) codex: test_default_file_loads_with_the_product_rules and test_metered.py."""
    return per_task_plans()


def _default_document() -> dict[str, Any]:
    return per_task_document()


def video(duration_seconds: float, resolution: str = "720p", **kwargs: Any) -> JobParams:
    return JobParams(duration_seconds=duration_seconds, resolution=resolution, **kwargs)


# --- the packaged default ---------------------------------------------------


def test_default_file_loads_with_the_product_rules() -> None:
    plans = load_plans()
    assert plans.version == "2026-11-01"
    assert plans.default_plan == "free"
    assert plans.credit_validity_months == 12
    assert plans.packs == (CreditPack("pack_10", 10, Money("USD", 400)),)
    assert set(plans.products) == {"sora", "codex"}
    assert set(plans.plans) == {"free", "plus", "pro"}

    sora = plans.product("sora")
    assert (sora.kind, sora.unit_name, sora.default_ttl_seconds) == ("video", "generation", 900)
    assert (sora.seconds_per_step, sora.credits_per_step, sora.max_duration_seconds) == (10, 1, 600.0)
    assert dict(sora.resolutions) == {"480p": 1, "720p": 1, "1080p": 2}
    assert dict(sora.models) == {"sora-2": 1}
    assert sora.default_model == "sora-2"

    codex = plans.product("codex")
    assert (codex.kind, codex.unit_name, codex.default_ttl_seconds) == ("metered", "task", 1800)
    assert {m: (r.input_milli, r.cached_input_milli, r.output_milli) for m, r in codex.rates.items()} == {
        "codex-max": (125_000, 12_500, 750_000), "codex": (62_500, 6_250, 375_000),
        "codex-mini": (18_750, 1_875, 113_000)}
    assert (codex.default_model, codex.fast_multiplier, codex.default_hold_credits, codex.overage) == (
        "codex", 2, 5, "draw")


def test_packaged_codex_included_usage() -> None:
    plans = load_plans()

    def usage(five_hour: int, weekly: int) -> tuple[Limit, ...]:
        return (Limit("five_hour", LimitKind.ROLLING, five_hour, hours=5), Limit("weekly", LimitKind.WEEK, weekly))
    assert plans.plan("free").products["codex"] == ProductRules(usage(10, 40), models=frozenset({"codex-mini", "codex"}),
                                                                max_debt_credits=5)
    assert plans.plan("plus").products["codex"] == ProductRules(usage(50, 250), max_debt_credits=25)
    assert plans.plan("pro").products["codex"] == ProductRules(usage(300, 1500), max_debt_credits=100)
    assert plans.allowance_unit("codex") == "credits" and plans.allowance_unit("sora") == "generation"


def test_per_task_codex_of_the_docs_loads() -> None:
    # docs/plans.md's per-task codex is a block that loads into the packaged plans.
    plans = per_task_plans()
    codex = plans.product("codex")
    assert (codex.kind, dict(codex.models), codex.max_units) == (
        "task", {"codex-mini": 1, "codex": 2, "codex-max": 5}, 100)
    assert plans.job_cost("codex", JobParams(model="codex-max", units=3)) == 15
    assert plans.allowance_unit("codex") == "task"
    assert plans.products["sora"] == load_plans().products["sora"]  # sora exactly as packaged


def _daily(free: int) -> tuple[Limit, ...]:
    return (Limit("daily", LimitKind.DAY, free),)


def test_default_plan_rules(plans: Plans) -> None:
    assert plans.plan("free").products["sora"] == ProductRules(_daily(30), 15.0, "720p", None, None)
    assert plans.plan("plus").products["sora"] == ProductRules(_daily(30), 15.0, "720p", None, None)
    assert plans.plan("pro").products["sora"] == ProductRules(_daily(100), 25.0, "1080p", None, None)
    assert plans.plan("free").products["codex"] == ProductRules(
        _daily(10), None, None, frozenset({"codex-mini", "codex"}), 5
    )
    assert plans.plan("plus").products["codex"] == ProductRules(_daily(50), None, None, None, 20)
    assert plans.plan("pro").products["codex"] == ProductRules(_daily(200), None, None, None, 100)


@pytest.mark.parametrize(
    ("plan", "product", "limit"),
    [("free", "sora", 30), ("plus", "sora", 30), ("pro", "sora", 100),
     ("free", "codex", 10), ("plus", "codex", 50), ("pro", "codex", 200)],
)
def test_free_limit(plans: Plans, plan: str, product: str, limit: int) -> None:
    assert plans.free_limit(plan, product) == limit


def test_default_ttl_seconds(plans: Plans) -> None:
    assert plans.default_ttl_seconds("sora") == 900
    assert plans.default_ttl_seconds("codex") == 1800


def test_load_plans_explicit_path_equals_packaged_default(plans: Plans, tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(_default_document()), encoding="utf-8")
    assert load_plans(str(path)) == plans
    packaged = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    path.write_text(packaged, encoding="utf-8")
    assert load_plans(str(path)) == load_plans()


def test_parsed_plans_are_immutable(plans: Plans) -> None:
    with pytest.raises(TypeError):
        plans.products["evil"] = plans.product("sora")  # type: ignore[index]
    with pytest.raises(TypeError):
        plans.product("sora").resolutions["4000p"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        plans.plan("free").products["sora"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plans.version = "x"  # type: ignore[misc]


# --- pricing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration_seconds", "resolution", "credits"),
    [
        (10, "720p", 1),
        (15, "720p", 2),
        (10, "1080p", 2),
        (0.5, "720p", 1),
        (20, "720p", 2),
        (20.001, "720p", 3),
        (10.0004, "720p", 1),  # rounds to 10000 ms: not a started second step
        (0.001, "720p", 1),
        (10, "480p", 1),
        (25, "1080p", 6),
        (600, "720p", 60),
        (600, "1080p", 120),
    ],
)
def test_sora_cost(plans: Plans, duration_seconds: float, resolution: str, credits: int) -> None:
    assert plans.job_cost("sora", video(duration_seconds, resolution)) == credits


def test_sora_cost_explicit_default_model(plans: Plans) -> None:
    assert plans.job_cost("sora", video(15, model="sora-2")) == 2


def test_sora_cost_accepts_units_one(plans: Plans) -> None:
    assert plans.job_cost("sora", video(15, units=1)) == 2


@pytest.mark.parametrize(
    ("model", "units", "credits"),
    [("", 0, 2), ("codex", 0, 2), ("codex-mini", 0, 1), ("codex-max", 0, 5),
     ("codex-mini", 1, 1), ("codex", 3, 6), ("codex-max", 100, 500)],
)
def test_codex_cost(plans: Plans, model: str, units: int, credits: int) -> None:
    assert plans.job_cost("codex", JobParams(model=model, units=units)) == credits


def test_codex_ignores_video_fields(plans: Plans) -> None:
    assert plans.job_cost("codex", JobParams(duration_seconds=99, resolution="4k")) == 2


@pytest.mark.parametrize(
    ("product", "job", "field"),
    [
        ("sora", video(0), "params.duration_seconds"),
        ("sora", video(-1), "params.duration_seconds"),
        ("sora", video(math.nan), "params.duration_seconds"),
        ("sora", video(math.inf), "params.duration_seconds"),
        ("sora", video(-math.inf), "params.duration_seconds"),
        ("sora", video(600.001), "params.duration_seconds"),
        ("sora", video(1e300), "params.duration_seconds"),
        ("sora", video(0.0004), "params.duration_seconds"),
        ("sora", video(10, ""), "params.resolution"),
        ("sora", video(10, "4k"), "params.resolution"),
        ("sora", video(10, "720P"), "params.resolution"),
        ("sora", video(10, model="sora-1"), "params.model"),
        ("sora", video(10, model="codex"), "params.model"),
        ("sora", video(10, units=2), "params.units"),
        ("codex", JobParams(model="sora-2"), "params.model"),
        ("codex", JobParams(units=101), "params.units"),
        ("codex", JobParams(units=-1), "params.units"),
        ("sora", video(10, extra={f"k{i}": "v" for i in range(33)}), "params.extra"),
        ("sora", video(10, extra={"": "v"}), "params.extra"),
        ("sora", video(10, extra={"k" * 65: "v"}), "params.extra"),
        ("codex", JobParams(extra={"k": "v" * 257}), "params.extra"),
        ("video", video(10), "product"),
        ("", video(10), "product"),
    ],
)
def test_invalid_jobs_name_the_field(plans: Plans, product: str, job: JobParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plans.job_cost(product, job)
    assert caught.value.field == field


def test_extra_at_the_limits_is_accepted(plans: Plans) -> None:
    extra = {f"{i:0>64}": "v" * 256 for i in range(32)}
    assert plans.job_cost("sora", video(10, extra=extra)) == 1


def test_error_messages_list_known_values(plans: Plans) -> None:
    with pytest.raises(InvalidArgument, match="480p, 720p, 1080p"):
        plans.job_cost("sora", video(10, "4k"))
    with pytest.raises(InvalidArgument, match="codex, sora"):
        plans.job_cost("gpt", video(10))
    with pytest.raises(InvalidArgument, match="codex, codex-max, codex-mini"):
        plans.job_cost("codex", JobParams(model="codex-ultra"))
    with pytest.raises(InvalidArgument, match="is required"):
        plans.job_cost("sora", video(10, ""))


def test_unknown_plan_is_invalid_argument(plans: Plans) -> None:
    for call in (
        lambda: plans.plan("enterprise"),
        lambda: plans.plan(""),
        lambda: plans.free_limit("enterprise", "sora"),
        lambda: plans.entitlement_denial("enterprise", "sora", video(10)),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.field == "plan"
        assert "free, plus, pro" in caught.value.description


def test_unknown_product_in_lookups(plans: Plans) -> None:
    for call in (
        lambda: plans.free_limit("free", "dalle"),
        lambda: plans.default_ttl_seconds("dalle"),
        lambda: plans.entitlement_denial("free", "dalle", video(10)),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.field == "product"


# --- entitlements -----------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "job", "allowed"),
    [
        ("free", video(15), True),
        ("free", video(15.0004), True),  # 15000 ms after rounding
        ("free", video(15.001), False),
        ("free", video(20), False),
        ("plus", video(15), True),
        ("plus", video(15.001), False),
        ("pro", video(25), True),
        ("pro", video(25.001), False),
        ("free", video(10, "480p"), True),
        ("free", video(10, "1080p"), False),
        ("plus", video(10, "1080p"), False),
        ("pro", video(10, "1080p"), True),
        ("pro", video(20, "720p"), True),
    ],
)
def test_sora_entitlements(plans: Plans, plan: str, job: JobParams, allowed: bool) -> None:
    plans.job_cost("sora", job)  # the contract: only valid jobs are asked about
    assert (plans.entitlement_denial(plan, "sora", job) is None) is allowed


@pytest.mark.parametrize(
    ("plan", "job", "allowed"),
    [
        ("free", JobParams(), True),
        ("free", JobParams(model="codex-mini", units=5), True),
        ("free", JobParams(units=6), False),
        ("free", JobParams(model="codex-max"), False),
        ("plus", JobParams(model="codex-max", units=20), True),
        ("plus", JobParams(units=21), False),
        ("pro", JobParams(model="codex-max", units=100), True),
    ],
)
def test_codex_entitlements(plans: Plans, plan: str, job: JobParams, allowed: bool) -> None:
    plans.job_cost("codex", job)
    assert (plans.entitlement_denial(plan, "codex", job) is None) is allowed


def test_denial_messages(plans: Plans) -> None:
    assert plans.entitlement_denial("free", "sora", video(20)) == (
        "sora on plan free allows videos up to 15 s (asked 20 s)"
    )
    assert plans.entitlement_denial("free", "sora", video(15.001)) == (
        "sora on plan free allows videos up to 15 s (asked 15.001 s)"
    )
    assert plans.entitlement_denial("plus", "sora", video(10, "1080p")) == (
        "sora on plan plus allows resolutions up to 720p (asked 1080p)"
    )
    assert plans.entitlement_denial("free", "codex", JobParams(model="codex-max")) == (
        "codex on plan free does not include model codex-max (allowed: codex, codex-mini)"
    )
    assert plans.entitlement_denial("plus", "codex", JobParams(units=21)) == (
        "codex on plan plus allows up to 20 tasks per job (asked 21)"
    )


def test_plan_without_the_product(tmp_path: Path) -> None:
    document = _default_document()
    document["plans"]["video_only"] = {"sora": {"daily_free": 1}}
    plans = parse_plans(document)
    assert plans.free_limit("video_only", "codex") == 0
    assert plans.entitlement_denial("video_only", "codex", JobParams()) == (
        "plan video_only does not include product codex"
    )
    # No limits in the plan entry: the product's own bounds apply.
    assert plans.entitlement_denial("video_only", "sora", video(600, "1080p")) is None


# --- offers -----------------------------------------------------------------


def test_offer_for_a_small_shortfall(plans: Plans) -> None:
    (offer,) = plans.offers(3)
    assert offer == Offer(CreditPack("pack_10", 10, Money("USD", 400)), 1)
    assert offer.total_price == Money("USD", 400)


@pytest.mark.parametrize(("short", "quantity"), [(1, 1), (10, 1), (11, 2), (25, 3), (30, 3), (31, 4)])
def test_offer_quantity_rounds_up(plans: Plans, short: int, quantity: int) -> None:
    (offer,) = plans.offers(short)
    assert offer.quantity == quantity
    assert offer.total_price.minor_units == 400 * quantity


def test_offer_for_25_costs_12_dollars(plans: Plans) -> None:
    (offer,) = plans.offers(25)
    assert (offer.quantity, offer.total_price) == (3, Money("USD", 1200))


@pytest.mark.parametrize("short", [0, -5])
def test_no_offers_without_a_shortfall(plans: Plans, short: int) -> None:
    assert plans.offers(short) == ()


def test_offers_sorted_by_total_then_pack_id() -> None:
    document = _default_document()
    document["packs"] = {
        "pack_50": {"credits": 50, "price": "15.00", "currency": "USD"},
        "pack_10": {"credits": 10, "price": "4.00", "currency": "USD"},
        "pack_5": {"credits": 5, "price": "2.00", "currency": "USD"},
        "pack_20": {"credits": 20, "price": "8.00", "currency": "USD"},
    }
    plans = parse_plans(document)
    offers = plans.offers(12)
    # pack_10 x2 = 800, pack_20 x1 = 800, pack_5 x3 = 600, pack_50 x1 = 1500
    assert [(o.pack.pack_id, o.quantity, o.total_price.minor_units) for o in offers] == [
        ("pack_5", 3, 600), ("pack_10", 2, 800), ("pack_20", 1, 800), ("pack_50", 1, 1500),
    ]


@pytest.mark.parametrize(("price", "minor"), [("4.00", 400), ("4", 400), ("4.5", 450), (4, 400), (4.5, 450),
                                              (4.05, 405), ("0.01", 1), ("19.99", 1999)])
def test_prices_convert_exactly(price: object, minor: int) -> None:
    document = _default_document()
    document["packs"]["pack_10"]["price"] = price
    assert parse_plans(document).packs[0].price.minor_units == minor


# --- strict validation --------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: object) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = document
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _delete(path: str) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = document
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


BROKEN_DOCUMENTS: list[tuple[str, Mutation, str]] = [
    ("daily_free negative", _set("plans/pro/sora/daily_free", -1), "plans.pro.sora.daily_free"),
    ("daily_free float", _set("plans/pro/sora/daily_free", 1.5), "plans.pro.sora.daily_free"),
    ("daily_free bool", _set("plans/pro/sora/daily_free", True), "plans.pro.sora.daily_free"),
    ("daily_free string", _set("plans/pro/sora/daily_free", "100"), "plans.pro.sora.daily_free"),
    ("daily_free too big", _set("plans/pro/sora/daily_free", 1_000_001), "plans.pro.sora.daily_free"),
    ("daily_free missing", _delete("plans/pro/sora/daily_free"), "plans.pro.sora.limits"),
    ("plan unknown key", _set("plans/pro/sora/colour", "red"), "plans.pro.sora.colour"),
    ("task key on video", _set("plans/pro/sora/max_units", 3), "plans.pro.sora.max_units"),
    ("video key on task", _set("plans/pro/codex/max_resolution", "720p"), "plans.pro.codex.max_resolution"),
    ("plan unknown product", _set("plans/pro/dalle", {"daily_free": 1}), "plans.pro.dalle"),
    ("plan bad name", _set("plans/Pro", {}), "plans.Pro"),
    ("plan not a mapping", _set("plans/pro", None), "plans.pro"),
    ("plan max_resolution unknown", _set("plans/pro/sora/max_resolution", "4k"), "plans.pro.sora.max_resolution"),
    ("plan max_resolution not listed", _set("plans/pro/sora/max_resolution", "2160p"),
     "plans.pro.sora.max_resolution"),
    ("plan models unknown", _set("plans/free/codex/models", ["codex", "gpt"]), "plans.free.codex.models"),
    ("plan models empty", _set("plans/free/codex/models", []), "plans.free.codex.models"),
    ("plan models not a list", _set("plans/free/codex/models", "codex"), "plans.free.codex.models"),
    ("plan models twice", _set("plans/free/codex/models", ["codex", "codex"]), "plans.free.codex.models"),
    ("plan duration zero", _set("plans/free/sora/max_duration_seconds", 0), "plans.free.sora.max_duration_seconds"),
    ("plan duration above bound", _set("plans/free/sora/max_duration_seconds", 601),
     "plans.free.sora.max_duration_seconds"),
    ("plan duration string", _set("plans/free/sora/max_duration_seconds", "15"),
     "plans.free.sora.max_duration_seconds"),
    ("plan max_units above bound", _set("plans/pro/codex/max_units", 101), "plans.pro.codex.max_units"),
    ("plan max_units zero", _set("plans/pro/codex/max_units", 0), "plans.pro.codex.max_units"),
    ("no plans", _set("plans", {}), "plans"),
    ("default_plan unknown", _set("default_plan", "gold"), "default_plan"),
    ("default_plan not a string", _set("default_plan", 3), "default_plan"),
    ("version not a string", _set("version", 20261101), "version"),
    ("version empty", _set("version", ""), "version"),
    ("validity zero", _set("credit_validity_months", 0), "credit_validity_months"),
    ("validity too long", _set("credit_validity_months", 121), "credit_validity_months"),
    ("validity missing", _delete("credit_validity_months"), "credit_validity_months"),
    ("top-level unknown key", _set("currency", "USD"), "currency"),
    ("price too precise string", _set("packs/pack_10/price", "4.001"), "packs.pack_10.price"),
    ("price too precise float", _set("packs/pack_10/price", 4.001), "packs.pack_10.price"),
    ("price negative", _set("packs/pack_10/price", "-4.00"), "packs.pack_10.price"),
    ("price negative number", _set("packs/pack_10/price", -4), "packs.pack_10.price"),
    ("price zero", _set("packs/pack_10/price", "0.00"), "packs.pack_10.price"),
    ("price exponent", _set("packs/pack_10/price", "4e2"), "packs.pack_10.price"),
    ("price nan", _set("packs/pack_10/price", float("nan")), "packs.pack_10.price"),
    ("price bool", _set("packs/pack_10/price", True), "packs.pack_10.price"),
    ("price missing", _delete("packs/pack_10/price"), "packs.pack_10.price"),
    ("currency lowercase", _set("packs/pack_10/currency", "usd"), "packs.pack_10.currency"),
    ("currency long", _set("packs/pack_10/currency", "USDT"), "packs.pack_10.currency"),
    ("pack credits zero", _set("packs/pack_10/credits", 0), "packs.pack_10.credits"),
    ("pack unknown key", _set("packs/pack_10/bonus", 1), "packs.pack_10.bonus"),
    ("pack bad name", _set("packs/Pack 10", {"credits": 1, "price": "1", "currency": "USD"}), "packs.Pack 10"),
    ("packs of two currencies", _set("packs/pack_eur", {"credits": 1, "price": "1", "currency": "EUR"}), "packs"),
    ("resolution key bad", _set("products/sora/resolutions/4k", 4), "products.sora.resolutions.4k"),
    ("resolution key five digits", _set("products/sora/resolutions/10000p", 4), "products.sora.resolutions.10000p"),
    ("resolution multiplier zero", _set("products/sora/resolutions/720p", 0), "products.sora.resolutions.720p"),
    ("resolutions empty", _set("products/sora/resolutions", {}), "products.sora.resolutions"),
    ("model multiplier float", _set("products/codex/models/codex", 2.5), "products.codex.models.codex"),
    ("model bad name", _set("products/codex/models/Codex", 2), "products.codex.models.Codex"),
    ("default_model unknown", _set("products/codex/default_model", "gpt"), "products.codex.default_model"),
    ("kind unknown", _set("products/sora/kind", "audio"), "products.sora.kind"),
    ("kind missing", _delete("products/sora/kind"), "products.sora.kind"),
    ("ttl zero", _set("products/sora/default_ttl_seconds", 0), "products.sora.default_ttl_seconds"),
    ("ttl too long", _set("products/sora/default_ttl_seconds", 86_401), "products.sora.default_ttl_seconds"),
    ("seconds_per_step zero", _set("products/sora/seconds_per_step", 0), "products.sora.seconds_per_step"),
    ("credits_per_step missing", _delete("products/sora/credits_per_step"), "products.sora.credits_per_step"),
    ("product max duration negative", _set("products/sora/max_duration_seconds", -5),
     "products.sora.max_duration_seconds"),
    ("product max duration inf", _set("products/sora/max_duration_seconds", float("inf")),
     "products.sora.max_duration_seconds"),
    ("product max_units missing", _delete("products/codex/max_units"), "products.codex.max_units"),
    ("video key on task product", _set("products/codex/resolutions", {"720p": 1}), "products.codex.resolutions"),
    ("task key on video product", _set("products/sora/max_units", 1), "products.sora.max_units"),
    ("product unknown key", _set("products/sora/price", 1), "products.sora.price"),
    ("product bad name", _set("products/Sora!", {}), "products.Sora!"),
    ("product name too long", _set("products/" + "a" * 33, {}), "products." + "a" * 33),
    ("unit bad", _set("products/sora/unit", "Video Generation"), "products.sora.unit"),
    ("no products", _set("products", {}), "products"),
    ("products a list", _set("products", ["sora"]), "products"),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [case[1:] for case in BROKEN_DOCUMENTS], ids=[case[0] for case in BROKEN_DOCUMENTS]
)
def test_broken_document_is_refused_naming_the_field(tmp_path: Path, mutate: Mutation, field: str) -> None:
    document = copy.deepcopy(_default_document())
    mutate(document)
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PlansError) as caught:
        load_plans(str(path))
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert f"{path}: {field}: " in str(caught.value)


BROKEN_TEXTS: list[tuple[str, str, str]] = [
    ("yaml syntax", "version: [unclosed\n", "<file>"),
    ("tab indentation", "plans:\n\tfree: {}\n", "<file>"),
    ("top-level list", "- free\n- pro\n", "<file>"),
    ("top-level scalar", "free\n", "<file>"),
    ("empty file", "", "<file>"),
    ("duplicate key", "version: '1'\nversion: '2'\n", "<file>"),
]


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in BROKEN_TEXTS], ids=[c[0] for c in BROKEN_TEXTS])
def test_broken_text_is_refused(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlansError) as caught:
        load_plans(str(path))
    assert caught.value.field == field
    assert str(path) in str(caught.value)


def test_duplicate_plan_is_refused_not_silently_overridden(tmp_path: Path) -> None:
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    assert "\nplans:\n" in text
    text = text.replace("\nplans:\n", "\nplans:\n  free:\n    sora: {daily_free: 1000}\n")
    path = tmp_path / "plans.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlansError, match="duplicate key 'free'"):
        load_plans(str(path))


def test_unquoted_date_version_is_refused(tmp_path: Path) -> None:
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    text = text.replace('version: "2026-11-01"', "version: 2026-11-01")
    path = tmp_path / "plans.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlansError) as caught:
        load_plans(str(path))
    assert caught.value.field == "version"
    assert "quoted" in caught.value.description


def test_missing_file_is_a_plans_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PlansError) as caught:
        load_plans(str(path))
    assert caught.value.field == "<file>"
    assert caught.value.source == str(path)


def test_non_utf8_file_is_a_plans_error(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_bytes(b"version: '\xff'\n")
    with pytest.raises(PlansError):
        load_plans(str(path))


def test_parse_plans_names_the_source() -> None:
    with pytest.raises(PlansError) as caught:
        parse_plans(["not", "a", "mapping"], source="inline")
    assert caught.value.field == "<file>"
    assert str(caught.value).startswith("inline: <file>: ")


def test_non_string_keys_are_refused() -> None:
    document = _default_document()
    document["products"]["sora"]["resolutions"] = {1080: 2}
    with pytest.raises(PlansError) as caught:
        parse_plans(document)
    assert caught.value.field == "products.sora.resolutions.1080"


def test_optional_rule_keys_may_be_omitted() -> None:
    document = _default_document()
    document["plans"]["free"]["sora"] = {"daily_free": 0}
    rules = parse_plans(document).plan("free").products["sora"]
    assert rules == ProductRules(limits=(Limit("daily", LimitKind.DAY, 0),))
    assert rules.daily_free == 0


def test_yaml_booleans_are_not_integers(tmp_path: Path) -> None:
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    text = text.replace("credit_validity_months: 12", "credit_validity_months: yes")
    path = tmp_path / "plans.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlansError) as caught:
        load_plans(str(path))
    assert caught.value.field == "credit_validity_months"


def test_notifications_section_is_optional_and_validated(tmp_path: Path) -> None:
    plans = load_plans()
    n = plans.notifications
    assert (n.free_warning_percent, n.lot_expiry_notice_days) == (80, 7)
    assert [n.credits_low_threshold(p) for p in ("free", "plus", "pro")] == [2, 5, 10]
    doc = yaml.safe_load(importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8"))
    del doc["notifications"]
    assert parse_plans(doc).notifications.credits_low_threshold("pro") == 0
    doc["notifications"] = {"credits_low": {"gold": 3}}
    with pytest.raises(PlansError, match="notifications.credits_low.gold"):
        parse_plans(doc)
    doc["notifications"] = {"free_warning_percent": 0}
    with pytest.raises(PlansError, match="notifications.free_warning_percent"):
        parse_plans(doc)
    assert plans.pack("pack_10").credits == 10


def test_limits_kinds_concurrency_and_shadow() -> None:
    document = _default_document()
    document["plans"]["pro"]["codex"] = {
        "limits": [{"id": "five_hour", "kind": "rolling", "hours": 5, "free": 50},
                   {"id": "weekly", "kind": "week", "free": 300},
                   {"id": "trial_cut", "kind": "day", "free": 20, "shadow": True}],
        "max_concurrent": 3}
    document["shadow"] = {"plans": ["plus"]}
    plans = parse_plans(document)
    rules = plans.rules("pro", "codex")
    assert rules is not None and rules.max_concurrent == 3 and not rules.concurrency_shadow
    assert rules.limits == (Limit("five_hour", LimitKind.ROLLING, 50, 5), Limit("weekly", LimitKind.WEEK, 300),
                            Limit("trial_cut", LimitKind.DAY, 20, shadow=True))
    assert rules.daily_free == 20
    plus = plans.rules("plus", "sora")
    assert plus is not None and plus.limits[0].shadow and plus.concurrency_shadow


@pytest.mark.parametrize("limits,field", [
    ([{"id": "x", "kind": "hourly", "free": 1}], "plans.pro.codex.limits[0].kind"),
    ([{"id": "x", "kind": "rolling", "free": 1}], "plans.pro.codex.limits[0].hours"),
    ([{"id": "x", "kind": "day", "free": 1, "hours": 3}], "plans.pro.codex.limits[0].hours"),
    ([{"id": "x", "kind": "rolling", "hours": 169, "free": 1}], "plans.pro.codex.limits[0].hours"),
    ([{"id": "x", "kind": "day", "free": -1}], "plans.pro.codex.limits[0].free"),
    ([{"id": "x", "kind": "day", "free": 1}, {"id": "x", "kind": "week", "free": 1}], "plans.pro.codex.limits"),
    ([], "plans.pro.codex.limits"),
    ([{"id": "x", "kind": "day", "free": 1, "shadow": "yes"}], "plans.pro.codex.limits[0].shadow"),
])
def test_bad_limits_are_refused(limits: list, field: str) -> None:
    document = _default_document()
    document["plans"]["pro"]["codex"] = {"limits": limits}
    with pytest.raises(PlansError) as caught:
        parse_plans(document)
    assert caught.value.field == field


def test_daily_free_and_limits_together_are_refused() -> None:
    document = _default_document()
    document["plans"]["pro"]["codex"]["limits"] = [{"id": "w", "kind": "week", "free": 1}]
    with pytest.raises(PlansError, match="either daily_free or limits"):
        parse_plans(document)
    document = _default_document()
    document["shadow"] = {"products": ["dalle"]}
    with pytest.raises(PlansError, match="shadow.products"):
        parse_plans(document)


def test_an_explicit_null_is_refused_not_read_as_absent() -> None:
    # `max_resolution:` left empty is YAML null: it must not mean "every resolution".
    for rules_path, value in (("sora/max_resolution", None), ("codex/max_units", None), ("codex/models", None),
                              ("sora/daily_free", None), ("sora/max_duration_seconds", None)):
        document = _default_document()
        product, key = rules_path.split("/")
        document["plans"]["free"][product][key] = value
        with pytest.raises(PlansError) as caught:
            parse_plans(document)
        assert caught.value.field == f"plans.free.{product}.{key}"
        assert "None" in caught.value.description or "nothing" in caught.value.description


def test_scheduled_section_errors_name_the_change() -> None:
    document = _default_document()
    document["scheduled"] = [{"effective_from": "2027-01-01T00:00:00Z", "plans": ["free"]}]
    with pytest.raises(PlansError) as caught:
        parse_plans(document)
    assert (caught.value.field, caught.value.description) == ("scheduled[0]: plans", "must be a mapping (got list)")


def _paths(node: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [prefix] + [path for key, child in children for path in _paths(child, (*prefix, key))]


def test_every_refusal_is_worded_by_the_plans_file_and_names_a_field() -> None:
    # Any value at any place: refused in this file's words (never pydantic's), naming a field of the
    # file: that place, or one that refers to it (a plan beyond a changed product bound).
    base = _default_document()
    base["plans"]["pro"]["codex"] = {"limits": [{"id": "x", "kind": "rolling", "hours": 5, "free": 3}]}
    base["shadow"] = {"plans": ["plus"]}
    base["scheduled"] = [{"effective_from": "2027-01-01T00:00:00Z", "plans": {"free": base["plans"]["free"]}}]
    for path in _paths(base)[1:]:
        for junk in (None, "x", -1, 1.5, True, [1], {"k": 1}):
            document = copy.deepcopy(base)
            *parents, last = path
            node: Any = document
            for key in parents:
                node = node[key]
            node[last] = junk
            try:
                parse_plans(document)
            except PlansError as exc:
                assert not exc.description.startswith(("Input should", "Field required")), (path, junk, exc)
                top = re.split(r"[.\[]", exc.field.removeprefix("scheduled[0]: "))[0]
                assert top in base or top == "scheduled", (path, junk, exc)


# --- the JSON Schema ------------------------------------------------------------


def test_checked_in_schema_is_the_models_schema() -> None:
    checked_in = importlib.resources.files("quota_sidecar").joinpath("plans.schema.json").read_text("utf-8")
    assert checked_in == plans_json_schema_text(), (
        "quota_sidecar/plans.schema.json is stale: python -m quota_sidecar.server.plans_file "
        "> quota_sidecar/plans.schema.json (and copy it to helm/quota-sidecar/files/)")


def test_chart_carries_the_schema_its_plans_name() -> None:
    # The chart's plans.yaml is the package's, modeline included: the schema it names sits next to it.
    chart_files = REPO / "helm" / "quota-sidecar" / "files"
    assert (chart_files / "plans.schema.json").read_text("utf-8") == plans_json_schema_text()
    modeline = (chart_files / "plans.yaml").read_text("utf-8").splitlines()[0]
    assert modeline == "# yaml-language-server: $schema=plans.schema.json"


def test_schema_command_prints_the_schema() -> None:
    result = subprocess.run([sys.executable, "-m", "quota_sidecar.server.plans_file"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == plans_json_schema()


def test_schema_states_the_structure() -> None:
    schema = plans_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "default_plan", "credit_validity_months", "packs", "products",
                                       "plans"}
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name
    rules = schema["$defs"]["RulesSection"]["properties"]
    assert set(rules) == {"daily_free", "limits", "max_concurrent", "max_duration_seconds", "max_resolution",
                          "models", "max_units", "max_debt_credits"}

