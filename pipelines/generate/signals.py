"""Vectorised signal building blocks: time base, first-order lags, coloured noise, regimes.

Everything works on one-minute samples: arrays of shape (n,), time constants in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

MINUTES_PER_DAY = 1440
LOCAL_TIMEZONE = "Europe/Berlin"


@dataclass(frozen=True)
class Calendar:
    """The plant's one-minute time base.

    timestamps: Datetime[us, UTC] series of length n; hour: local hour of day in [0, 24) as float;
    weekday: local ISO weekday (1 = Monday .. 7 = Sunday); the local zone is `timezone`.
    """

    timestamps: pl.Series
    hour: np.ndarray
    weekday: np.ndarray
    timezone: str

    @property
    def n(self) -> int:
        return len(self.timestamps)


def as_utc(start: datetime) -> datetime:
    """A naive datetime is taken as UTC; an aware one is converted to UTC."""
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


def make_calendar(start: datetime, days: float, timezone: str = LOCAL_TIMEZONE) -> Calendar:
    """One-minute UTC grid of `days` days from `start`, with local-time features in `timezone`."""
    n = int(round(days * MINUTES_PER_DAY))
    if n < 120:
        raise ValueError(f"days must cover at least two hours of one-minute samples, got days={days}")
    start = as_utc(start).replace(second=0, microsecond=0)
    ts = pl.datetime_range(start, start + timedelta(minutes=n - 1), "1m", time_zone="UTC", eager=True)
    local = ts.dt.convert_time_zone(timezone)
    hour = (local.dt.hour().cast(pl.Float64) + local.dt.minute().cast(pl.Float64) / 60.0).to_numpy()
    weekday = local.dt.weekday().cast(pl.Int8).to_numpy()
    return Calendar(ts.alias("timestamp"), hour, weekday, timezone)


def lag(x: np.ndarray, tau: float) -> np.ndarray:
    """First-order lag (time constant `tau` minutes) of x, starting in steady state at x[0].

    Computed as an FFT convolution with the exponential impulse response truncated at 10 tau
    (error below 5e-5 of a step), so a month of minutes costs milliseconds.
    """
    x = np.asarray(x, dtype=np.float64)
    if tau <= 0:
        return x.copy()
    a = np.exp(-1.0 / tau)
    m = int(np.ceil(10 * tau))
    kernel = (1 - a) * a ** np.arange(m)
    kernel /= kernel.sum()
    padded = np.concatenate([np.full(m, x[0]), x])
    size = 1 << int(np.ceil(np.log2(len(padded) + m)))
    y = np.fft.irfft(np.fft.rfft(padded, size) * np.fft.rfft(kernel, size), size)
    return y[m : m + len(x)]


def smooth_noise(rng: np.random.Generator, n: int, tau: float) -> np.ndarray:
    """Zero-mean, unit-std coloured noise: white noise through a first-order lag of `tau` minutes."""
    m = int(np.ceil(10 * tau))
    z = lag(rng.standard_normal(n + m), tau)[m:]
    return (z - z.mean()) / (z.std() + 1e-12)


def piecewise_constant(
    rng: np.random.Generator, n: int, mean_minutes: float, values: np.ndarray | tuple[float, float]
) -> np.ndarray:
    """Setpoint-like signal: constant segments of exponential length (mean `mean_minutes`).

    `values` is either a (low, high) range drawn uniformly or an array of discrete levels.
    """
    lengths = np.maximum(30, rng.exponential(mean_minutes, size=int(3 * n / mean_minutes) + 3)).astype(np.int64)
    while lengths.sum() < n:
        lengths = np.concatenate([lengths, lengths])
    k = int(np.searchsorted(np.cumsum(lengths), n)) + 1
    if isinstance(values, tuple):
        levels = rng.uniform(values[0], values[1], size=k)
    else:
        levels = rng.choice(np.asarray(values, dtype=np.float64), size=k)
    return np.repeat(levels, lengths[:k])[:n]


def event_mask(rng: np.random.Generator, n: int, per_day: float, minutes: tuple[int, int]) -> np.ndarray:
    """Boolean mask of random events (Poisson, `per_day` on average) lasting `minutes` (low, high)."""
    count = rng.poisson(per_day * n / MINUTES_PER_DAY)
    starts = rng.integers(0, n, size=count)
    ends = np.minimum(n, starts + rng.integers(minutes[0], minutes[1] + 1, size=count))
    edges = np.zeros(n + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    return np.cumsum(edges[:n]) > 0


def daily_bump(hour: np.ndarray, center: float, width: float) -> np.ndarray:
    """Gaussian bump around local hour `center` (hours), wrapping around midnight."""
    d = (hour - center + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def ambient_temperature(rng: np.random.Generator, calendar: Calendar) -> np.ndarray:
    """Hall temperature in degC: daily swing peaking mid-afternoon plus slow weather wander."""
    n = calendar.n
    daily = 3.5 * np.sin(2 * np.pi * (calendar.hour - 9.0) / 24.0)
    weather = 2.5 * smooth_noise(rng, n, 2 * MINUTES_PER_DAY)
    return 18.0 + daily + weather
