"""Tests of quota_sidecar.domain.windows: daily windows in IANA time zones."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quota_sidecar.domain.errors import InvalidArgument
from quota_sidecar.domain.model import Window
from quota_sidecar.domain.windows import candidate_windows, daily_window, time_zone

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MINUTE_MS = 60_000


def utc_ms(*fields: int) -> int:
    return int(datetime(*fields, tzinfo=timezone.utc).timestamp() * 1000)


def local_ms(tz: str, *fields: int) -> int:
    return int(datetime(*fields, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def local_clock(tz: str, at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, tz=ZoneInfo(tz))


# --- time_zone ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Etc/UTC", "Europe/Paris", "Asia/Kolkata", "America/Argentina/Buenos_Aires",
                                  "Etc/GMT+5", "America/Port-au-Prince"])
def test_time_zone_accepts_iana_names(name: str) -> None:
    assert time_zone(name).key == name


def test_time_zone_is_cached() -> None:
    assert time_zone("Europe/Berlin") is time_zone("Europe/Berlin")


@pytest.mark.parametrize(
    "name",
    ["", "Mars/Olympus_Mons", "Europe/Pariss", "utc ", " UTC", "../etc/passwd", "Europe/../UTC",
     "/usr/share/zoneinfo/UTC", "/etc/localtime", "localtime", "posixrules", "right/UTC", "posix/UTC",
     "Europe\\Paris", "Europe/Paris\x00", "Europe/", "Europe//Paris", "A" * 65, "+05:30"],
)
def test_time_zone_refuses_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        time_zone(name)
    assert caught.value.field == "time_zone"


def test_daily_window_refuses_bad_zone() -> None:
    with pytest.raises(InvalidArgument) as caught:
        daily_window("Nowhere/Special", 0)
    assert caught.value.field == "time_zone"


# --- daily_window -------------------------------------------------------------


def test_utc_day() -> None:
    assert daily_window("UTC", utc_ms(2026, 11, 1, 12, 34, 56)) == Window(
        "20261101", utc_ms(2026, 11, 1), utc_ms(2026, 11, 2)
    )


def test_epoch_and_before() -> None:
    assert daily_window("UTC", 0) == Window("19700101", 0, DAY_MS)
    assert daily_window("UTC", -1) == Window("19691231", -DAY_MS, 0)


def test_kolkata_half_hour_offset() -> None:
    # Local midnight in Kolkata (+05:30) is 18:30 UTC the day before.
    window = daily_window("Asia/Kolkata", utc_ms(2026, 11, 1, 20, 0))
    assert window == Window("20261102", utc_ms(2026, 11, 1, 18, 30), utc_ms(2026, 11, 2, 18, 30))


@pytest.mark.parametrize(
    ("tz", "day", "hours"),
    [
        ("America/New_York", (2026, 3, 8), 23),
        ("America/New_York", (2026, 11, 1), 25),
        ("America/New_York", (2026, 7, 1), 24),
        ("Europe/London", (2026, 3, 29), 23),
        ("Europe/London", (2026, 10, 25), 25),
        ("Australia/Lord_Howe", (2026, 4, 5), 24.5),  # half-hour DST
        ("America/Santiago", (2026, 9, 6), 23),
        # Santiago sets clocks back at 24:00 Saturday: the Saturday is long.
        ("America/Santiago", (2026, 4, 4), 25),
        ("America/Santiago", (2026, 4, 5), 24),
    ],
)
def test_day_lengths_follow_dst(tz: str, day: tuple[int, int, int], hours: float) -> None:
    window = daily_window(tz, local_ms(tz, *day, 12))
    assert window.label == f"{day[0]:04d}{day[1]:02d}{day[2]:02d}"
    assert window.end_ms - window.start_ms == int(hours * HOUR_MS)


def test_new_york_windows_start_at_local_midnight() -> None:
    short = daily_window("America/New_York", local_ms("America/New_York", 2026, 3, 8, 12))
    assert short.start_ms == utc_ms(2026, 3, 8, 5)  # midnight EST
    assert short.end_ms == utc_ms(2026, 3, 9, 4)  # midnight EDT
    long = daily_window("America/New_York", local_ms("America/New_York", 2026, 11, 1, 12))
    assert long.start_ms == utc_ms(2026, 11, 1, 4)
    assert long.end_ms == utc_ms(2026, 11, 2, 5)


def test_new_york_repeated_hour_belongs_to_the_same_day() -> None:
    first_one_am = utc_ms(2026, 11, 1, 5, 30)  # 01:30 EDT
    second_one_am = utc_ms(2026, 11, 1, 6, 30)  # 01:30 EST
    assert daily_window("America/New_York", first_one_am) == daily_window("America/New_York", second_one_am)


def test_santiago_day_starting_in_a_dst_gap() -> None:
    # On 2026-09-06 Santiago's clocks jump from 00:00 to 01:00: midnight never
    # happens and the day begins at the transition, shown as 01:00 local.
    window = daily_window("America/Santiago", local_ms("America/Santiago", 2026, 9, 6, 12))
    assert window.label == "20260906"
    assert window.start_ms == utc_ms(2026, 9, 6, 4)
    first = local_clock("America/Santiago", window.start_ms)
    assert (first.date().isoformat(), first.hour, first.minute) == ("2026-09-06", 1, 0)
    last_of_previous_day = local_clock("America/Santiago", window.start_ms - 1)
    assert last_of_previous_day.date().isoformat() == "2026-09-05"
    assert daily_window("America/Santiago", window.start_ms - 1).end_ms == window.start_ms


@pytest.mark.parametrize(
    "tz", ["UTC", "Asia/Kolkata", "America/New_York", "America/Santiago", "Pacific/Chatham", "Asia/Kathmandu"]
)
@pytest.mark.parametrize("day", [(2026, 1, 1), (2026, 3, 8), (2026, 9, 6), (2026, 11, 1), (2028, 2, 29)])
def test_labels_around_local_midnight(tz: str, day: tuple[int, int, int]) -> None:
    window = daily_window(tz, local_ms(tz, *day, 12))
    label = f"{day[0]:04d}{day[1]:02d}{day[2]:02d}"
    assert window.label == label
    assert daily_window(tz, window.start_ms).label == label
    assert daily_window(tz, window.end_ms - 1).label == label
    assert daily_window(tz, window.start_ms - 1).label < label
    assert daily_window(tz, window.end_ms).label > label
    assert local_clock(tz, window.start_ms - 1).date() < local_clock(tz, window.start_ms).date()


def test_label_changes_exactly_at_local_midnight_in_paris() -> None:
    midnight = local_ms("Europe/Paris", 2026, 12, 31, 23, 59, 59) + 1000
    assert daily_window("Europe/Paris", midnight - 1).label == "20261231"
    assert daily_window("Europe/Paris", midnight).label == "20270101"
    assert daily_window("Europe/Paris", midnight).start_ms == midnight


def test_samoa_skipped_day_leaves_no_window() -> None:
    # Samoa skipped 2011-12-30 entirely; the 29th ends where the 31st begins.
    day_29 = daily_window("Pacific/Apia", local_ms("Pacific/Apia", 2011, 12, 29, 12))
    day_31 = daily_window("Pacific/Apia", day_29.end_ms)
    assert (day_29.label, day_31.label) == ("20111229", "20111231")
    assert day_29.end_ms == day_31.start_ms
    previous, current, following = candidate_windows("Pacific/Apia", day_29.end_ms - 1)
    assert following == day_31


def test_clock_set_back_across_midnight_stays_in_the_new_day() -> None:
    # Until 2011 St John's set clocks back at 00:01 to 23:01. The day begins at
    # the first 00:00 (fold=0); the repeated 23:01-23:59 that follows, though
    # it shows the previous date, stays in the new day's window so that the
    # windows never overlap.
    tz = "America/St_Johns"
    first_midnight = utc_ms(2010, 11, 7, 2, 30)
    repeated = utc_ms(2010, 11, 7, 3, 0)
    assert local_clock(tz, repeated).strftime("%Y%m%d %H:%M") == "20101106 23:30"
    window = daily_window(tz, repeated)
    assert window == daily_window(tz, first_midnight)
    assert window.label == "20101107"
    assert window.start_ms == first_midnight
    assert daily_window(tz, first_midnight - 1).end_ms == first_midnight


# --- candidate_windows ----------------------------------------------------------


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata", "America/New_York", "America/Santiago", "Pacific/Kiritimati"])
@pytest.mark.parametrize("day", [(2026, 3, 8), (2026, 9, 6), (2026, 11, 1), (2026, 12, 31)])
def test_candidate_windows_are_contiguous(tz: str, day: tuple[int, int, int]) -> None:
    now = local_ms(tz, *day, 9, 15)
    previous, current, following = candidate_windows(tz, now)
    assert current == daily_window(tz, now)
    assert previous.end_ms == current.start_ms
    assert current.end_ms == following.start_ms
    assert previous.label < current.label < following.label
    assert previous == daily_window(tz, current.start_ms - 1)
    assert following == daily_window(tz, current.end_ms)


def test_candidate_windows_utc_labels() -> None:
    labels = [w.label for w in candidate_windows("UTC", utc_ms(2027, 1, 1, 0, 0))]
    assert labels == ["20261231", "20270101", "20270102"]


def test_candidate_windows_across_new_york_short_day() -> None:
    previous, current, following = candidate_windows("America/New_York", local_ms("America/New_York", 2026, 3, 9, 8))
    assert [w.end_ms - w.start_ms for w in (previous, current, following)] == [23 * HOUR_MS, DAY_MS, DAY_MS]


# --- properties -----------------------------------------------------------------

ZONES = ["UTC", "Asia/Kolkata", "America/New_York", "America/Santiago", "Europe/London", "Australia/Lord_Howe",
         "Pacific/Chatham", "Pacific/Apia", "Asia/Kathmandu", "America/St_Johns"]


@settings(max_examples=300, deadline=None)
@given(tz=st.sampled_from(ZONES), at_ms=st.integers(min_value=utc_ms(1950, 1, 1), max_value=utc_ms(2100, 1, 1)))
def test_window_contains_the_instant(tz: str, at_ms: int) -> None:
    window = daily_window(tz, at_ms)
    assert window.start_ms <= at_ms < window.end_ms
    assert 22 * HOUR_MS <= window.end_ms - window.start_ms <= 26 * HOUR_MS
    clock = local_clock(tz, at_ms)
    if clock.fold == 0:
        assert window.label == clock.strftime("%Y%m%d")
    else:  # a repeated hour set back across midnight: see the St John's test
        assert window.label >= clock.strftime("%Y%m%d")
    assert local_clock(tz, window.start_ms).time().hour <= 1
    previous, current, following = candidate_windows(tz, at_ms)
    assert current == window
    assert previous.end_ms == window.start_ms and window.end_ms == following.start_ms


def test_every_transition_of_a_zone_keeps_windows_contiguous() -> None:
    # Walk day by day through years of DST changes in zones with odd rules.
    for tz in ("America/Santiago", "America/Havana", "Asia/Tehran", "Africa/Casablanca", "Europe/Dublin"):
        window = daily_window(tz, local_ms(tz, 2015, 1, 1, 12))
        stop = local_ms(tz, 2028, 1, 1)
        while window.start_ms < stop:
            following = daily_window(tz, window.end_ms)
            assert following.start_ms == window.end_ms
            assert following.label > window.label
            assert (datetime.strptime(following.label, "%Y%m%d") - datetime.strptime(window.label, "%Y%m%d")
                    == timedelta(days=1))
            window = following


# ---------------------------------------------------------------- calendar months


def test_monthly_window_in_a_zone() -> None:
    from quota_sidecar.domain.windows import candidate_months, monthly_window

    # 2026-11-01 00:30 in Tokyo is still October 31 in UTC.
    at = int(datetime(2026, 10, 31, 15, 30, tzinfo=timezone.utc).timestamp() * 1000)
    w = monthly_window("Asia/Tokyo", at)
    assert (w.label, w.start_ms, w.end_ms) == (
        "202611",
        int(datetime(2026, 10, 31, 15, 0, tzinfo=timezone.utc).timestamp() * 1000),
        int(datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc).timestamp() * 1000),
    )
    assert monthly_window("UTC", at).label == "202610"
    prev, cur, nxt = candidate_months("America/New_York", at)
    assert [prev.label, cur.label, nxt.label] == ["202609", "202610", "202611"]
    assert prev.end_ms == cur.start_ms and cur.end_ms == nxt.start_ms
    # December rolls into the next year
    dec = monthly_window("UTC", int(datetime(2026, 12, 15, tzinfo=timezone.utc).timestamp() * 1000))
    assert dec.label == "202612" and dec.end_ms == int(datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)


def test_weekly_window_starts_monday_in_the_zone() -> None:
    from quota_sidecar.domain.windows import candidate_weeks, weekly_window

    # Sunday 2026-11-22 23:30 in New York is Monday 04:30 UTC: still the week of Monday the 16th there.
    at = int(datetime(2026, 11, 23, 4, 30, tzinfo=timezone.utc).timestamp() * 1000)
    ny = weekly_window("America/New_York", at)
    assert (ny.label, ny.start_ms, ny.end_ms) == (
        "20261116",
        int(datetime(2026, 11, 16, 5, 0, tzinfo=timezone.utc).timestamp() * 1000),
        int(datetime(2026, 11, 23, 5, 0, tzinfo=timezone.utc).timestamp() * 1000),
    )
    assert weekly_window("UTC", at).label == "20261123"
    prev, cur, nxt = candidate_weeks("UTC", at)
    assert [prev.label, cur.label, nxt.label] == ["20261116", "20261123", "20261130"]
    assert prev.end_ms == cur.start_ms and cur.end_ms == nxt.start_ms
    # the week with the DST change is 169 hours long in New York (fall back on 2026-11-01)
    fall = weekly_window("America/New_York", int(datetime(2026, 10, 28, tzinfo=timezone.utc).timestamp() * 1000))
    assert fall.end_ms - fall.start_ms == 169 * 3_600_000
