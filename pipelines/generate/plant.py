"""The synthetic plant in memory: units, their clean and anomalous signals, and the ground-truth labels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl

from pipelines.generate.anomalies import ANOMALY_KINDS, Anomaly, degradation_effects, inject, plan_anomalies
from pipelines.generate.equipment import EQUIPMENT_TYPES, EquipmentType, Schedule, simulate_sensors
from pipelines.generate.signals import (
    LOCAL_TIMEZONE,
    MINUTES_PER_DAY,
    Calendar,
    ambient_temperature,
    as_utc,
    make_calendar,
)

# A Monday; the default month spans the spring daylight-saving change in Europe/Berlin (29 March 2026).
DEFAULT_START = datetime(2026, 3, 2, tzinfo=UTC)
LABEL_COLUMNS = ("equipment", "equipment_type", "start", "end", "kind", "sensors")
LABEL_SCHEMA = {
    "equipment": pl.String,
    "equipment_type": pl.String,
    "start": pl.Datetime("us", "UTC"),
    "end": pl.Datetime("us", "UTC"),
    "kind": pl.String,
    "sensors": pl.String,
}


@dataclass(frozen=True)
class PlantSpec:
    """What to simulate. scale multiplies the number of units of every type (at least one each).

    clean_fraction: leading share of the time range kept anomaly-free (the training period).
    anomalies_per_unit: anomalies per unit in the rest; kinds rotate over units so all kinds occur.
    """

    days: float = 30.0
    scale: float = 1.0
    seed: int = 0
    start: datetime = DEFAULT_START
    clean_fraction: float = 0.4
    anomalies_per_unit: int = 3
    timezone: str = LOCAL_TIMEZONE

    def __post_init__(self) -> None:
        if not self.days > 0:
            raise ValueError(f"days must be positive, got {self.days}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1), got {self.clean_fraction}")
        if self.anomalies_per_unit < 0:
            raise ValueError(f"anomalies_per_unit must be >= 0, got {self.anomalies_per_unit}")
        object.__setattr__(self, "start", as_utc(self.start))

    def unit_counts(self) -> dict[str, int]:
        return {name: max(1, int(round(t.base_units * self.scale))) for name, t in EQUIPMENT_TYPES.items()}

    def units(self) -> list[tuple[EquipmentType, int, str]]:
        """(type, index within type, equipment id) for every unit, in a fixed order."""
        out = []
        for name, count in self.unit_counts().items():
            etype = EQUIPMENT_TYPES[name]
            out.extend((etype, i, eid) for i, eid in enumerate(etype.unit_ids(count)))
        return out


@dataclass(frozen=True)
class UnitTruth:
    """Ground truth of one unit on the one-minute UTC grid.

    clean: timestamp + sensors, normal behaviour (same schedule, outages after failures included).
    data: the same with the injected anomalies: exactly the values the logs carry, before log defects.
    running: (n,) bool, the unit's running state; outage: (n,) bool, down after a failure (not labelled).
    """

    equipment_id: str
    equipment_type: str
    clean: pl.DataFrame
    data: pl.DataFrame
    running: np.ndarray
    outage: np.ndarray
    anomalies: list[Anomaly]
    labels: pl.DataFrame

    def label_mask(self) -> np.ndarray:
        """(n,) bool: True inside any labelled window."""
        mask = np.zeros(self.data.height, dtype=bool)
        for a in self.anomalies:
            mask[a.start : a.end + 1] = True
        return mask


@dataclass(frozen=True)
class PlantTruth:
    """The simulated plant: every unit's truth and all labels (sorted by equipment, start)."""

    spec: PlantSpec
    calendar: Calendar
    units: list[UnitTruth] = field(default_factory=list)

    @property
    def labels(self) -> pl.DataFrame:
        return concat_labels([u.labels for u in self.units])

    def unit(self, equipment_id: str) -> UnitTruth:
        for u in self.units:
            if u.equipment_id == equipment_id:
                return u
        raise KeyError(f"no unit {equipment_id!r}; units are {[u.equipment_id for u in self.units]}")


def concat_labels(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return pl.DataFrame(schema=LABEL_SCHEMA)
    return pl.concat(frames).sort(["equipment", "start"], maintain_order=True)


def unit_kinds(etype_index: int, unit_index: int, count: int) -> list[str]:
    """Anomaly kinds of a unit: a rotation through all kinds, offset per type, so that the units of one
    type together cover every kind as soon as units * count >= number of kinds."""
    k = len(ANOMALY_KINDS)
    return [ANOMALY_KINDS[(2 * etype_index + unit_index * count + j) % k] for j in range(count)]


def simulate_unit(
    spec: PlantSpec, calendar: Calendar, ambient: np.ndarray, etype: EquipmentType, unit_index: int, eid: str
) -> UnitTruth:
    """Simulate one unit. Its random streams depend on (seed, type, unit index) only, so a unit is the same
    whatever the scale or the order of generation."""
    n = calendar.n
    etype_index = list(EQUIPMENT_TYPES).index(etype.name)
    schedule_ss, plan_ss, noise_ss, inject_ss = np.random.SeedSequence([spec.seed, etype_index, unit_index]).spawn(4)
    schedule = etype.schedule(np.random.default_rng(schedule_ss), calendar, unit_index)
    plan_rng = np.random.default_rng(plan_ss)

    first = int(round(spec.clean_fraction * n))
    kinds = unit_kinds(etype_index, unit_index, spec.anomalies_per_unit)
    plan_rng.shuffle(kinds)
    plan = plan_anomalies(etype, schedule.run > 0.5, first, kinds, plan_rng)
    wear_extra, outage = degradation_effects(plan, n)
    # slow normal wear: a unit-specific baseline creeping up over the month
    wear = plan_rng.uniform(0.0, 0.15) + 0.03 * np.arange(n) / (30 * MINUTES_PER_DAY)

    run = np.where(outage, 0.0, schedule.run)
    schedule = Schedule(run, schedule.load, schedule.extra)
    clean = simulate_sensors(etype, schedule, wear, ambient, np.random.default_rng(noise_ss))
    if wear_extra.any():
        # same noise stream: data and clean differ only where the anomaly acts
        data = simulate_sensors(etype, schedule, wear + wear_extra, ambient, np.random.default_rng(noise_ss))
    else:
        data = {k: v.copy() for k, v in clean.items()}
    running = run > 0.5
    sigma = {}
    for name, x in clean.items():
        ref = x[running] if running.sum() > 10 else x
        sigma[name] = max(float(ref.std()), etype.sensor(name).noise, 1e-6)
    inject(etype, data, plan, running, sigma, np.random.default_rng(inject_ss))

    def frame(signals: dict[str, np.ndarray]) -> pl.DataFrame:
        cols = {}
        for s in etype.sensors:  # logged resolution: the truth holds exactly what the logs hold
            cols[s.name] = np.round(np.clip(signals[s.name], s.min, s.max), s.decimals)
        return pl.DataFrame(cols).insert_column(0, calendar.timestamps)

    ts = calendar.timestamps
    labels = pl.DataFrame(
        {
            "equipment": [eid] * len(plan),
            "equipment_type": [etype.name] * len(plan),
            "start": ts.gather([a.start for a in plan]),
            "end": ts.gather([a.end for a in plan]),
            "kind": [a.kind for a in plan],
            "sensors": [";".join(a.sensors) for a in plan],
        },
        schema=LABEL_SCHEMA,
    ).sort("start")
    plan = sorted(plan, key=lambda a: a.start)
    return UnitTruth(eid, etype.name, frame(clean), frame(data), running, outage, plan, labels)


def plant_calendar(spec: PlantSpec) -> Calendar:
    return make_calendar(spec.start, spec.days, spec.timezone)


def iter_units(spec: PlantSpec, calendar: Calendar) -> Iterator[UnitTruth]:
    """Simulate the plant one unit at a time (memory stays at one unit whatever the scale)."""
    ambient = ambient_temperature(np.random.default_rng([spec.seed, 9999]), calendar)
    for etype, index, eid in spec.units():
        yield simulate_unit(spec, calendar, ambient, etype, index, eid)


def simulate_plant(
    days: float = 30.0,
    scale: float = 1.0,
    seed: int = 0,
    *,
    start: datetime = DEFAULT_START,
    clean_fraction: float = 0.4,
    anomalies_per_unit: int = 3,
) -> PlantTruth:
    """The whole plant in memory (no files): clean and anomalous frames of every unit plus labels."""
    spec = PlantSpec(days, scale, seed, start, clean_fraction, anomalies_per_unit)
    calendar = plant_calendar(spec)
    return PlantTruth(spec, calendar, list(iter_units(spec, calendar)))
