"""Pipeline stages as functions over polars frames: ingest, train, score, evaluate, register."""
