"""Daily free-allowance windows in IANA time zones.

A window is one local calendar day of the account's time zone, as the
half-open interval of instants [first instant of the day, first instant of
the next day). Days are not always 24 hours: a DST change makes them 23 or 25.

The first instant of a local date is local midnight resolved with fold=0. When
midnight is inside a DST gap (America/Santiago moves 00:00 -> 01:00), fold=0
uses the offset in force before the gap, which lands exactly on the
transition instant, i.e. 01:00 local: the first instant that shows that date.
When a clock is set back across midnight (St John's until 2011: 00:01 back to
23:01), the day begins at the first 00:00 and the repeated hour, although it
shows the previous date, belongs to the new day: windows never overlap, and
every instant is in exactly one window.

Only the standard library ``zoneinfo`` is used; the ``tzdata`` package
supplies the database where the system has none. All times are integer
milliseconds since the Unix epoch.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from quota_sidecar.domain.errors import InvalidArgument
from quota_sidecar.domain.model import Window

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_ONE_DAY = timedelta(days=1)

# IANA names use only these characters; anything else (spaces, backslashes,
# NUL, dots) is refused before zoneinfo touches the file system.
_ZONE_NAME_RE = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*")
_MAX_ZONE_NAME_CHARS = 64
# Entries of the system zoneinfo directory that are not portable zone names:
# the host's own zone and the alternative trees (right/ counts leap seconds),
# on which two sidecars could disagree.
_NOT_ZONES = frozenset({"localtime", "posixrules", "posix", "right"})

# A window is recomputed at most this many times when an instant falls outside
# the window of its local date (only around odd historical transitions).
_MAX_WINDOW_ADJUSTMENTS = 4


@functools.lru_cache(maxsize=512)
def time_zone(name: str) -> ZoneInfo:
    """Return the IANA zone ``name``; InvalidArgument("time_zone") if it is not one."""
    _check_zone_name(name)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidArgument("time_zone", f"unknown IANA time zone {name!r}") from exc


def _check_zone_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("time_zone", "is required (an IANA name such as Europe/Paris)")
    if len(name) > _MAX_ZONE_NAME_CHARS:
        raise InvalidArgument("time_zone", f"is longer than {_MAX_ZONE_NAME_CHARS} characters")
    if ".." in name or name.startswith("/"):
        raise InvalidArgument("time_zone", f"must be an IANA name, not a path ({name!r})")
    if name.split("/")[0] in _NOT_ZONES:
        raise InvalidArgument("time_zone", f"{name!r} is not a portable IANA zone name")
    if not _ZONE_NAME_RE.fullmatch(name):
        raise InvalidArgument("time_zone", f"unknown IANA time zone {name!r}")


def daily_window(tz: str, at_ms: int) -> Window:
    """The window of the local date (in ``tz``) that contains the instant ``at_ms``.

    Always ``start_ms <= at_ms < end_ms``; windows of consecutive days touch.
    """
    zone = time_zone(tz)
    day = _local_date(zone, at_ms)
    window = _window_of_date(zone, day)
    # Normally one pass. If a clock was set back across midnight, or a gap
    # straddles it, an instant can show a date whose fold=0 window does not
    # contain it; stepping to the neighbouring day keeps start <= at < end
    # and the windows a partition of time.
    for _ in range(_MAX_WINDOW_ADJUSTMENTS + 1):
        if at_ms < window.start_ms:
            day -= _ONE_DAY
        elif at_ms >= window.end_ms:
            day += _ONE_DAY
        else:
            return window
        window = _window_of_date(zone, day)
    raise AssertionError(f"no daily window contains {at_ms} in {tz}")


def candidate_windows(tz: str, approx_now_ms: int) -> tuple[Window, Window, Window]:
    """The windows of the local days before, of, and after approx_now's local date.

    A sidecar whose clock is off by up to a day still offers the window the
    authoritative (Redis) clock will pick.
    """
    current = daily_window(tz, approx_now_ms)
    # Derived from instants, not date arithmetic, so a skipped date (Samoa,
    # 2011-12-30) is stepped over and the three windows stay contiguous.
    previous = daily_window(tz, current.start_ms - 1)
    following = daily_window(tz, current.end_ms)
    return previous, current, following


def monthly_window(tz: str, at_ms: int) -> Window:
    """The calendar month (in ``tz``) containing ``at_ms``, labelled YYYYMM.

    It runs from the first instant of the month's first local day to the
    first instant of the next month's, so it is made of whole daily windows.
    """
    zone = time_zone(tz)
    label = daily_window(tz, at_ms).label
    first = date(int(label[:4]), int(label[4:6]), 1)
    following = (first + 32 * _ONE_DAY).replace(day=1)
    window = Window(label=label[:6], start_ms=_first_instant_ms(zone, first),
                    end_ms=_first_instant_ms(zone, following))
    assert window.start_ms <= at_ms < window.end_ms, (tz, at_ms, window)
    return window


def weekly_window(tz: str, at_ms: int) -> Window:
    """The calendar week (Monday to Sunday, in ``tz``) containing ``at_ms``, labelled by its Monday (YYYYMMDD)."""
    zone = time_zone(tz)
    label = daily_window(tz, at_ms).label
    day = date(int(label[:4]), int(label[4:6]), int(label[6:]))
    monday = day - day.weekday() * _ONE_DAY
    window = Window(label=_label(monday), start_ms=_first_instant_ms(zone, monday),
                    end_ms=_first_instant_ms(zone, monday + 7 * _ONE_DAY))
    assert window.start_ms <= at_ms < window.end_ms, (tz, at_ms, window)
    return window


def candidate_weeks(tz: str, approx_now_ms: int) -> tuple[Window, Window, Window]:
    """The weeks before, of, and after approx_now's local week (see candidate_windows)."""
    current = weekly_window(tz, approx_now_ms)
    return weekly_window(tz, current.start_ms - 1), current, weekly_window(tz, current.end_ms)


def candidate_months(tz: str, approx_now_ms: int) -> tuple[Window, Window, Window]:
    """The months before, of, and after approx_now's local month (see candidate_windows)."""
    current = monthly_window(tz, approx_now_ms)
    return monthly_window(tz, current.start_ms - 1), current, monthly_window(tz, current.end_ms)


@dataclass(frozen=True)
class Candidates:
    """The day, week and month windows a decision offers Redis (see candidate_windows)."""

    days: tuple[Window, Window, Window]
    weeks: tuple[Window, Window, Window]
    months: tuple[Window, Window, Window]


# Zone -> the candidates of its current local day. They change only when that day ends, and
# computing them (nine zoneinfo conversions) is a large share of a decision's CPU.
_candidates_cache: OrderedDict[str, Candidates] = OrderedDict()
_CANDIDATES_CACHE_ZONES = 1024


def candidates(tz: str, approx_now_ms: int) -> Candidates:
    """candidate_windows, _weeks and _months of ``tz`` at ``approx_now_ms``, cached per local day."""
    cached = _candidates_cache.get(tz)
    if cached is not None and cached.days[1].start_ms <= approx_now_ms < cached.days[1].end_ms:
        return cached
    fresh = Candidates(days=candidate_windows(tz, approx_now_ms), weeks=candidate_weeks(tz, approx_now_ms),
                       months=candidate_months(tz, approx_now_ms))
    _candidates_cache[tz] = fresh
    _candidates_cache.move_to_end(tz)
    if len(_candidates_cache) > _CANDIDATES_CACHE_ZONES:
        _candidates_cache.popitem(last=False)
    return fresh


def _window_of_date(zone: ZoneInfo, day: date) -> Window:
    return Window(
        label=_label(day),
        start_ms=_first_instant_ms(zone, day),
        end_ms=_first_instant_ms(zone, day + _ONE_DAY),
    )


def _first_instant_ms(zone: ZoneInfo, day: date) -> int:
    midnight = datetime.combine(day, time(0), tzinfo=zone)  # fold=0, see module doc
    return _to_ms(midnight)


def _local_date(zone: ZoneInfo, at_ms: int) -> date:
    # Arithmetic from the epoch rather than fromtimestamp(): no platform limits
    # on negative or far-future instants, and milliseconds stay exact.
    return (_EPOCH + at_ms * _ONE_MS).astimezone(zone).date()


def _to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _ONE_MS


def _label(day: date) -> str:
    # Not strftime: %Y does not zero-pad years below 1000 on every platform.
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"
