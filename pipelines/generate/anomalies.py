"""Labelled anomalies: where they go (planning) and what they do to the signals (injection).

Magnitudes are in units of a sensor's normal variability `sigma` (its std over running samples of the
clean signal), so the same plan is visible on rpm and on bar. Windows are sample indices, end inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.generate.equipment import EquipmentType
from pipelines.generate.signals import smooth_noise

ANOMALY_KINDS = ("spike", "level_shift", "drift", "stuck", "broken_correlation", "oscillation", "degradation")

# Window length range per kind, in minutes (shortened to fit when the test period is short).
DURATIONS: dict[str, tuple[int, int]] = {
    "spike": (1, 3),
    "level_shift": (120, 720),
    "drift": (360, 1440),
    "stuck": (120, 480),
    "broken_correlation": (240, 720),
    "oscillation": (60, 240),
    "degradation": (1440, 4320),
}
# Magnitude range per kind, in sigma (degradation: final extra wear, dimensionless).
MAGNITUDES: dict[str, tuple[float, float]] = {
    "spike": (5.0, 8.0),
    "level_shift": (2.0, 3.0),
    "drift": (2.5, 4.0),
    "stuck": (0.0, 0.0),
    "broken_correlation": (0.0, 0.0),
    "oscillation": (1.5, 2.5),
    "degradation": (1.5, 2.2),
}
OUTAGE_MINUTES = (360, 600)  # a failed unit stays down for repair this long
# Kinds invisible on a stopped machine, most demanding first: they get the slots where the unit runs most.
NEEDS_RUNNING = ("degradation", "broken_correlation", "oscillation", "stuck")
IDLE_KINDS = ("level_shift", "drift", "spike")  # sensor faults that show on an idle machine too
MIN_RUNNING = 60  # running minutes a slot needs for a NEEDS_RUNNING kind


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly on one unit.

    start/end: first and last affected sample (inclusive). sensors: the first is modified; the others are
    involved (partner of a broken correlation, co-oscillating signal); degradation modifies all of them.
    outage: samples the unit stays down after a failure (degradation only), starting at end + 1.
    """

    kind: str
    start: int
    end: int
    sensors: tuple[str, ...]
    magnitude: float
    sign: float = 1.0
    period: float = 0.0
    outage: int = 0


def plan_anomalies(
    etype: EquipmentType,
    running: np.ndarray,
    first_index: int,
    kinds: list[str],
    rng: np.random.Generator,
) -> list[Anomaly]:
    """Place one anomaly of each of `kinds` in [first_index, n), one per slot, without overlaps.

    Slots hold equal running time (stopped minutes count 1/20), so that even a machine idle for most
    of the period shows its anomalies. Kinds that need a running machine get the slots where the unit
    runs most, and within its slot an anomaly goes where the unit runs the most of its window (a stuck
    or decoupled sensor on a stopped machine would be invisible); a failure happens while running. Where
    a slot has almost no running time (a short range over a weekend), such a kind becomes a sensor fault
    from IDLE_KINDS. Other kinds keep the order given.
    """
    n = len(running)
    count = len(kinds)
    if count == 0:
        return []
    if (n - first_index) // count < 20:
        raise ValueError(
            f"test period too short for {count} anomalies per unit: {n - first_index} minutes "
            "(raise days, lower clean_fraction or anomalies_per_unit)"
        )
    weight = np.cumsum(np.where(running[first_index:], 1.0, 0.05))
    bounds = first_index + np.searchsorted(weight, weight[-1] * np.arange(count + 1) / count)
    bounds[0], bounds[-1] = first_index, n
    bounds = np.maximum(bounds, first_index + 20 * np.arange(count + 1))  # at least 20 minutes each
    bounds = np.minimum(bounds, n - 20 * np.arange(count, -1, -1))
    csum = np.concatenate([[0], np.cumsum(running.astype(np.int64))])
    slot_running = [running[bounds[j] : bounds[j + 1]].mean() for j in range(count)]
    needy = sorted((k for k in kinds if k in NEEDS_RUNNING), key=NEEDS_RUNNING.index)
    ordered = needy + [k for k in kinds if k not in NEEDS_RUNNING]
    slots = np.argsort(-np.asarray(slot_running), kind="stable")
    plan: list[Anomaly] = []
    used = set(kinds)
    for j, kind in sorted(zip(slots.tolist(), ordered)):
        s0, slot = int(bounds[j]), int(bounds[j + 1] - bounds[j])
        placed = _place(kind, s0, slot, running, csum, rng)
        if placed is None:
            # the machine hardly runs here (a short range over a weekend): use a sensor fault instead
            kind = next((k for k in IDLE_KINDS if k not in used), IDLE_KINDS[0])
            used.add(kind)
            placed = _place(kind, s0, slot, running, csum, rng)
        assert placed is not None
        start, length, outage = placed
        groups = etype.anomaly_sensors[kind]
        sensors = groups[int(rng.integers(len(groups)))]
        magnitude = float(rng.uniform(*MAGNITUDES[kind]))
        sign = float(rng.choice([-1.0, 1.0]))
        period = float(rng.uniform(6.0, 20.0)) if kind == "oscillation" else 0.0
        plan.append(Anomaly(kind, start, start + length - 1, sensors, magnitude, sign, period, outage))
    return plan


def _place(
    kind: str, s0: int, slot: int, running: np.ndarray, csum: np.ndarray, rng: np.random.Generator
) -> tuple[int, int, int] | None:
    """(start, length, outage) of a `kind` window in the slot [s0, s0 + slot), or None when the kind needs
    a running machine and the slot has too little running time."""
    margin = max(1, slot // 20)
    if kind in NEEDS_RUNNING and running[s0 + margin : s0 + slot - margin].sum() < MIN_RUNNING:
        return None
    lo, hi = DURATIONS[kind]
    outage = min(int(rng.integers(*OUTAGE_MINUTES)), slot // 4) if kind == "degradation" else 0
    cap = max(1, min(int(0.6 * slot), slot - outage - 2 * margin))
    length = max(1, min(int(rng.integers(lo, hi + 1)), cap))
    if kind == "degradation":
        # the failure (last sample) must hit a running machine: pick it first, then fit the window
        first_end = s0 + margin + length // 2
        ends = np.flatnonzero(running[first_end : s0 + slot - margin - outage])
        if not len(ends):
            return None
        end = first_end + int(rng.choice(ends))
        start = max(s0 + margin, end - length + 1)
        return start, end - start + 1, outage
    latest = s0 + slot - margin - length
    starts = rng.integers(s0 + margin, max(s0 + margin + 1, latest + 1), size=48)
    score = (csum[starts + length] - csum[starts]) / length
    start = int(starts[int(np.argmax(score))])
    if kind in NEEDS_RUNNING and score.max() < 0.5:
        # random candidates missed the running stretches (a machine that runs only briefly in this slot):
        # take the start with the most running minutes among all possible starts
        every = np.arange(s0 + margin, max(s0 + margin + 1, latest + 1))
        start = int(every[int(np.argmax(csum[every + length] - csum[every]))])
    if kind in NEEDS_RUNNING:
        # trim the window to where the machine runs, where the anomaly shows
        on = np.flatnonzero(running[start : start + length])
        if len(on):
            start, length = start + int(on[0]), int(on[-1] - on[0]) + 1
    return start, length, outage


def degradation_effects(plan: list[Anomaly], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Extra wear (shape (n,)) growing exponentially to each failure, and the outage mask after it.

    The wear stays at its final value while the unit is down and resets when it restarts (repaired).
    """
    wear = np.zeros(n)
    outage = np.zeros(n, dtype=bool)
    for a in plan:
        if a.kind != "degradation":
            continue
        u = np.linspace(0.0, 1.0, a.end - a.start + 1)
        wear[a.start : a.end + 1] = a.magnitude * np.expm1(4.0 * u) / np.expm1(4.0)
        wear[a.end + 1 : a.end + 1 + a.outage] = a.magnitude
        outage[a.end + 1 : a.end + 1 + a.outage] = True
    return wear, outage


def inject(
    etype: EquipmentType,
    data: dict[str, np.ndarray],
    plan: list[Anomaly],
    running: np.ndarray,
    sigma: dict[str, float],
    rng: np.random.Generator,
) -> None:
    """Apply the signal-level anomalies of `plan` to `data` in place (degradation acts through physics)."""
    for a in plan:
        w = slice(a.start, a.end + 1)
        length = a.end - a.start + 1
        name = a.sensors[0]
        spec = etype.sensor(name)
        x = data[name]
        amp = a.magnitude * sigma[name]
        if a.kind in ("spike", "level_shift", "drift"):
            shape = np.ones(length) if a.kind != "drift" else np.linspace(1.0 / length, 1.0, length)
            # keep inside the physical range (the ingest would null it): turn to the side with room
            room = {1.0: spec.max - x[w].max(), -1.0: x[w].min() - spec.min}
            sign = a.sign if room[a.sign] >= amp else max(room, key=lambda k: room[k])
            x[w] = x[w] + sign * min(amp, max(room[sign], 0.0)) * shape
        elif a.kind == "stuck":
            x[w] = x[a.start]
        elif a.kind == "broken_correlation":
            # the sensor stops following its partner: an independent slow wander with the window's level
            on = running[w]
            seg = x[w]
            level = seg[on].mean() if on.any() else seg.mean()
            spread = max(float(seg[on].std()) if on.sum() > 1 else 0.0, 0.5 * sigma[name])
            wander = level + spread * smooth_noise(rng, length, 10.0) + spec.noise * rng.standard_normal(length)
            x[w] = np.where(on, wander, seg)
        elif a.kind == "oscillation":
            t = np.arange(length)
            on = running[w].astype(np.float64)
            for i, other in enumerate(a.sensors):
                phase = -0.5 * np.pi * i  # a co-oscillating signal lags by a quarter period
                scale = 1.0 if i == 0 else 0.8
                data[other][w] = data[other][w] + scale * a.magnitude * sigma[other] * on * np.sin(
                    2 * np.pi * t / a.period + phase
                )
        elif a.kind != "degradation":
            raise ValueError(f"unknown anomaly kind {a.kind!r}; expected one of {ANOMALY_KINDS}")
