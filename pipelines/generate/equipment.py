"""Equipment types of the synthetic plant: sensors, operating schedules and coupled physics.

Each type turns an operating schedule (running state, load in [0, 1]) plus wear and hall temperature into
sensor signals with plausible coupling: load drives speed, flow, motor current and discharge pressure;
temperatures follow load through first-order lags; vibration grows with speed squared and with wear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipelines.generate.signals import (
    MINUTES_PER_DAY,
    Calendar,
    daily_bump,
    event_mask,
    lag,
    piecewise_constant,
    smooth_noise,
)


@dataclass(frozen=True)
class Sensor:
    """One sensor: physical limits (min, max) in `unit`, logged resolution and measurement noise (std)."""

    name: str
    unit: str
    min: float
    max: float
    decimals: int
    noise: float
    required: bool = True


@dataclass(frozen=True)
class Schedule:
    """How a unit is operated: running (0/1 float), load in [0, 1], and type-specific setpoints."""

    run: np.ndarray
    load: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


ScheduleFn = Callable[[np.random.Generator, Calendar, int], Schedule]
PhysicsFn = Callable[[Schedule, np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class EquipmentType:
    """An equipment type: its sensors (model input order), naming, defaults and behaviour.

    `anomaly_sensors` maps an anomaly kind to candidate sensor groups: the first sensor of a group is
    modified, the others are involved (the partner of a broken correlation, a co-oscillating signal).
    """

    name: str
    description: str
    prefix: str
    first_number: int
    base_units: int
    sensors: tuple[Sensor, ...]
    load_sensor: str
    current_sensor: str
    schedule: ScheduleFn
    physics: PhysicsFn
    anomaly_sensors: dict[str, tuple[tuple[str, ...], ...]]

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    def sensor(self, name: str) -> Sensor:
        return next(s for s in self.sensors if s.name == name)

    def unit_ids(self, count: int) -> list[str]:
        return [f"{self.prefix}-{self.first_number + i}" for i in range(count)]


# --- centrifugal pump on a variable-speed drive -----------------------------------------------------------

PUMP_SENSORS = (
    Sensor("speed_rpm", "rpm", 0.0, 1800.0, 1, 3.0),
    Sensor("flow_m3h", "m3/h", 0.0, 400.0, 1, 1.5),
    Sensor("suction_pressure_bar", "bar", -1.0, 6.0, 3, 0.01),
    Sensor("discharge_pressure_bar", "bar", -1.0, 25.0, 3, 0.03),
    Sensor("motor_current_a", "A", 0.0, 200.0, 2, 0.4),
    Sensor("motor_temp_c", "degC", -20.0, 160.0, 2, 0.15),
    Sensor("bearing_temp_c", "degC", -20.0, 140.0, 2, 0.15, required=False),
    Sensor("vibration_mm_s", "mm/s", 0.0, 50.0, 3, 0.04),
)


def pump_schedule(rng: np.random.Generator, cal: Calendar, unit_index: int) -> Schedule:
    """Water demand: morning and evening peaks, night trough, lower weekends, setpoint changes, stops."""
    n = cal.n
    daily = 0.62 + 0.2 * daily_bump(cal.hour, 7.5, 2.0) + 0.14 * daily_bump(cal.hour, 19.0, 2.5)
    daily -= 0.14 * daily_bump(cal.hour, 3.0, 2.5)
    weekly = np.where(cal.weekday >= 6, 0.85, 1.0)
    setpoint = piecewise_constant(rng, n, 3 * MINUTES_PER_DAY, (0.88, 1.08))
    load = lag(daily * weekly * setpoint, 20) + 0.04 * smooth_noise(rng, n, 20)
    run = ~event_mask(rng, n, 0.25, (30, 360))
    return Schedule(run.astype(np.float64), np.clip(load, 0.25, 1.0))


def pump_physics(s: Schedule, wear: np.ndarray, ambient: np.ndarray) -> dict[str, np.ndarray]:
    r = lag(s.run, 1.5)  # drive ramps over a few minutes on start/stop
    speed = r * (900.0 + 580.0 * s.load)
    n = speed / 1480.0
    flow = r * 250.0 * s.load
    q = flow / 250.0
    suction = 1.3 - 0.15 * q**2
    discharge = suction + r * (1.2 + 5.2 * n**2 - 0.8 * q**2)
    current = r * 9.0 + 62.0 * n**3 * (1.0 + 0.12 * wear)
    # copper losses ~ current^2, lagged; wear (slow, days) scales the lagged heating so that a repaired
    # unit is exactly the clean one again after its outage
    motor_temp = ambient + lag(48.0 * ((r * 9.0 + 62.0 * n**3) / 70.0) ** 2, 40) * (1.0 + 0.1 * wear) ** 2
    # wear heats the bearing only while it turns; kept outside the lag so that a repaired unit (wear reset)
    # is exactly the clean one again after its outage
    bearing_temp = ambient + lag(22.0 * n, 60) + 18.0 * wear * lag(r, 60)
    vibration = 0.45 + 1.9 * n**2 * (1.0 + 3.0 * wear)
    return {
        "speed_rpm": speed,
        "flow_m3h": flow,
        "suction_pressure_bar": suction,
        "discharge_pressure_bar": discharge,
        "motor_current_a": current,
        "motor_temp_c": motor_temp,
        "bearing_temp_c": bearing_temp,
        "vibration_mm_s": vibration,
    }


# --- oil-injected screw air compressor ---------------------------------------------------------------------

COMPRESSOR_SENSORS = (
    Sensor("speed_rpm", "rpm", 0.0, 3600.0, 1, 4.0),
    Sensor("inlet_flow_nm3h", "Nm3/h", 0.0, 2500.0, 1, 6.0),
    Sensor("suction_pressure_bar", "bar", 0.5, 1.2, 4, 0.002),
    Sensor("discharge_pressure_bar", "bar", 0.0, 12.0, 3, 0.02),
    Sensor("suction_temp_c", "degC", -20.0, 60.0, 2, 0.15),
    Sensor("discharge_temp_c", "degC", -20.0, 130.0, 2, 0.2),
    Sensor("motor_power_kw", "kW", 0.0, 250.0, 1, 0.8),
    Sensor("motor_current_a", "A", 0.0, 450.0, 1, 1.2),
    Sensor("oil_pressure_bar", "bar", 0.0, 6.0, 3, 0.02),
    Sensor("oil_temp_c", "degC", -20.0, 120.0, 2, 0.15),
    Sensor("vibration_de_mm_s", "mm/s", 0.0, 45.0, 3, 0.04),
    Sensor("vibration_nde_mm_s", "mm/s", 0.0, 45.0, 3, 0.04, required=False),
)


def compressor_schedule(rng: np.random.Generator, cal: Calendar, unit_index: int) -> Schedule:
    """Compressed-air demand follows the three shifts; odd-numbered units are trim machines that start
    only when demand is high (nights and weekends off), even ones carry the base load."""
    n = cal.n
    shift = np.select([(cal.hour >= 6) & (cal.hour < 14), (cal.hour >= 14) & (cal.hour < 22)], [0.9, 0.72], 0.42)
    weekend = np.select([cal.weekday == 6, cal.weekday == 7], [0.55, 0.4], 1.0)
    setpoint = piecewise_constant(rng, n, 4 * MINUTES_PER_DAY, (0.9, 1.1))
    demand = lag(shift * weekend * setpoint, 20)
    noise = 0.05 * smooth_noise(rng, n, 10)
    stops = event_mask(rng, n, 0.1, (20, 240))
    if unit_index % 2:
        run = (demand > 0.6) & ~stops
        load = 0.35 + 1.3 * (demand - 0.6) + noise
    else:
        run = ~stops
        load = 1.05 * demand + noise
    return Schedule(run.astype(np.float64), np.clip(load, 0.25, 1.0))


def compressor_physics(s: Schedule, wear: np.ndarray, ambient: np.ndarray) -> dict[str, np.ndarray]:
    r = lag(s.run, 2.0)
    speed = r * (1700.0 + 1250.0 * s.load)
    n = speed / 2950.0
    flow = r * 1850.0 * s.load
    suction = 0.985 - 0.035 * (flow / 1850.0) ** 2
    discharge = 7.0 + 0.55 * r * s.load  # the net holds ~7 bar when this machine is off (check valve)
    suction_temp = ambient + 1.5
    power = r * (35.0 + 120.0 * s.load * discharge / 7.5) * (1.0 + 0.08 * wear)
    current = power * 1000.0 / (np.sqrt(3.0) * 400.0 * 0.88)
    oil_pressure = 0.15 + r * (1.6 + 1.7 * n)
    oil_temp = ambient + lag(r * (38.0 + 16.0 * s.load), 30) + 8.0 * wear * lag(r, 30)
    discharge_temp = oil_temp + lag(r * (10.0 + 7.0 * s.load), 5)
    vib_de = 0.55 + 1.6 * n**2 * (1.0 + 2.5 * wear)
    vib_nde = 0.45 + 1.15 * n**2 * (1.0 + 2.0 * wear)
    return {
        "speed_rpm": speed,
        "inlet_flow_nm3h": flow,
        "suction_pressure_bar": suction,
        "discharge_pressure_bar": discharge,
        "suction_temp_c": suction_temp,
        "discharge_temp_c": discharge_temp,
        "motor_power_kw": power,
        "motor_current_a": current,
        "oil_pressure_bar": oil_pressure,
        "oil_temp_c": oil_temp,
        "vibration_de_mm_s": vib_de,
        "vibration_nde_mm_s": vib_nde,
    }


# --- belt conveyor drive -----------------------------------------------------------------------------------

CONVEYOR_SENSORS = (
    Sensor("belt_speed_m_s", "m/s", 0.0, 5.0, 3, 0.01),
    Sensor("load_t_h", "t/h", 0.0, 1600.0, 1, 6.0),
    Sensor("motor_current_a", "A", 0.0, 250.0, 2, 0.5),
    Sensor("motor_temp_c", "degC", -20.0, 160.0, 2, 0.15),
    Sensor("gearbox_temp_c", "degC", -20.0, 140.0, 2, 0.15),
    Sensor("vibration_mm_s", "mm/s", 0.0, 50.0, 3, 0.04),
)


def conveyor_schedule(rng: np.random.Generator, cal: Calendar, unit_index: int) -> Schedule:
    """Two shifts Monday to Friday (06-22 local), Saturday morning, idle on Sunday; bursty material flow,
    belt-speed setpoint changes and short unplanned stops."""
    n = cal.n
    weekday_shift = (cal.weekday <= 5) & (cal.hour >= 6) & (cal.hour < 22)
    saturday = (cal.weekday == 6) & (cal.hour >= 6) & (cal.hour < 14)
    run = (weekday_shift | saturday) & ~event_mask(rng, n, 0.4, (10, 90))
    material = 0.62 + 0.22 * smooth_noise(rng, n, 15) + 0.1 * smooth_noise(rng, n, 180)
    belt = piecewise_constant(rng, n, 4 * MINUTES_PER_DAY, np.array([2.0, 2.5, 3.15]))
    return Schedule(run.astype(np.float64), np.clip(material, 0.05, 1.0), {"belt_setpoint": belt})


def conveyor_physics(s: Schedule, wear: np.ndarray, ambient: np.ndarray) -> dict[str, np.ndarray]:
    r = lag(s.run, 0.7)
    v = r * s.extra["belt_setpoint"]
    load = r * 800.0 * s.load * (v / 2.5)
    current = r * 22.0 + 8.0 * v + 0.085 * load * (1.0 + 0.1 * wear)
    motor_temp = ambient + lag(36.0 * ((r * 22.0 + 8.0 * v + 0.085 * load) / 100.0) ** 2, 35) * (1.0 + 0.05 * wear) ** 2
    gearbox_temp = ambient + lag(r * (14.0 + 0.022 * load), 90) + 12.0 * wear * lag(r, 90)
    vibration = 0.35 + 1.3 * (v / 3.0) ** 2 * (1.0 + 3.0 * wear)
    return {
        "belt_speed_m_s": v,
        "load_t_h": load,
        "motor_current_a": current,
        "motor_temp_c": motor_temp,
        "gearbox_temp_c": gearbox_temp,
        "vibration_mm_s": vibration,
    }


EQUIPMENT_TYPES: dict[str, EquipmentType] = {
    "pump": EquipmentType(
        name="pump",
        description="centrifugal pump on a variable-speed drive",
        prefix="P",
        first_number=101,
        base_units=3,
        sensors=PUMP_SENSORS,
        load_sensor="flow_m3h",
        current_sensor="motor_current_a",
        schedule=pump_schedule,
        physics=pump_physics,
        anomaly_sensors={
            "spike": (("discharge_pressure_bar",), ("motor_current_a",), ("vibration_mm_s",)),
            "level_shift": (("suction_pressure_bar",), ("flow_m3h",), ("motor_temp_c",)),
            "drift": (("discharge_pressure_bar",), ("bearing_temp_c",), ("flow_m3h",)),
            "stuck": (("flow_m3h",), ("discharge_pressure_bar",), ("motor_current_a",)),
            "broken_correlation": (("motor_current_a", "flow_m3h"), ("discharge_pressure_bar", "speed_rpm")),
            "oscillation": (("discharge_pressure_bar", "flow_m3h"), ("vibration_mm_s",)),
            "degradation": (("vibration_mm_s", "bearing_temp_c", "motor_current_a"),),
        },
    ),
    "compressor": EquipmentType(
        name="compressor",
        description="oil-injected screw air compressor",
        prefix="K",
        first_number=201,
        base_units=2,
        sensors=COMPRESSOR_SENSORS,
        load_sensor="inlet_flow_nm3h",
        current_sensor="motor_current_a",
        schedule=compressor_schedule,
        physics=compressor_physics,
        anomaly_sensors={
            "spike": (("discharge_pressure_bar",), ("vibration_de_mm_s",), ("oil_pressure_bar",)),
            "level_shift": (("discharge_temp_c",), ("oil_pressure_bar",), ("inlet_flow_nm3h",)),
            "drift": (("oil_temp_c",), ("discharge_pressure_bar",), ("suction_temp_c",)),
            "stuck": (("motor_power_kw",), ("discharge_temp_c",), ("inlet_flow_nm3h",)),
            "broken_correlation": (("motor_current_a", "motor_power_kw"), ("discharge_temp_c", "oil_temp_c")),
            "oscillation": (("discharge_pressure_bar", "inlet_flow_nm3h"), ("speed_rpm", "motor_power_kw")),
            "degradation": (("vibration_de_mm_s", "vibration_nde_mm_s", "oil_temp_c", "motor_power_kw"),),
        },
    ),
    "conveyor": EquipmentType(
        name="conveyor",
        description="belt conveyor drive (motor and gearbox)",
        prefix="C",
        first_number=301,
        base_units=2,
        sensors=CONVEYOR_SENSORS,
        load_sensor="load_t_h",
        current_sensor="motor_current_a",
        schedule=conveyor_schedule,
        physics=conveyor_physics,
        anomaly_sensors={
            "spike": (("motor_current_a",), ("vibration_mm_s",)),
            "level_shift": (("gearbox_temp_c",), ("load_t_h",)),
            "drift": (("motor_temp_c",), ("belt_speed_m_s",)),
            "stuck": (("load_t_h",), ("motor_current_a",)),
            "broken_correlation": (("motor_current_a", "load_t_h"),),
            "oscillation": (("vibration_mm_s",), ("load_t_h", "motor_current_a")),
            "degradation": (("vibration_mm_s", "gearbox_temp_c", "motor_current_a"),),
        },
    ),
}


def simulate_sensors(
    etype: EquipmentType,
    schedule: Schedule,
    wear: np.ndarray,
    ambient: np.ndarray,
    noise_rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Sensor signals of one unit: physics plus measurement noise, limited to the physical range.

    Vibration noise is partly multiplicative (it scales with the signal), as in real RMS velocity.
    """
    clean = etype.physics(schedule, wear, ambient)
    out: dict[str, np.ndarray] = {}
    for s in etype.sensors:
        x = clean[s.name]
        noise = s.noise * noise_rng.standard_normal(len(x))
        if s.unit == "mm/s":
            noise = noise + 0.04 * x * noise_rng.standard_normal(len(x))
        out[s.name] = np.clip(x + noise, s.min, s.max)
    return out
