"""The embedded synthetic plant: default data for the demo, the tests and the benchmarks.

`simulate_plant` returns the ground truth in memory (clean and anomalous frames per unit, labels);
`generate_plant` writes it as realistic plant logs with a plant.toml, labels.csv and README.txt.
"""

from pipelines.generate.anomalies import ANOMALY_KINDS, Anomaly
from pipelines.generate.equipment import EQUIPMENT_TYPES, EquipmentType, Sensor
from pipelines.generate.folder import CONFIG_FILE, LABELS_FILE, README_FILE, GeneratedPlant, generate_plant
from pipelines.generate.logs import SENTINEL, LogSource, log_sources
from pipelines.generate.plant import DEFAULT_START, PlantSpec, PlantTruth, UnitTruth, simulate_plant

__all__ = [
    "ANOMALY_KINDS",
    "CONFIG_FILE",
    "DEFAULT_START",
    "EQUIPMENT_TYPES",
    "LABELS_FILE",
    "README_FILE",
    "SENTINEL",
    "Anomaly",
    "EquipmentType",
    "GeneratedPlant",
    "LogSource",
    "PlantSpec",
    "PlantTruth",
    "Sensor",
    "UnitTruth",
    "generate_plant",
    "log_sources",
    "simulate_plant",
]
