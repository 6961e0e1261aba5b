"""The detector as an MLflow pyfunc "model from code" (logged by `pipelines.registry`; see ECOSYSTEM.md).

MLflow executes this file when it loads the model: `load_context` rebuilds the `RoMDetector` from the logged
folder (weights.pt read with weights_only=True; detector.json with config, sensors, scalers, thresholds), and
`predict` scores a pandas or polars frame of one equipment type's readings (see `RoMDetector.score_frame`):

    model = mlflow.pyfunc.load_model("models:/<name>@champion")
    model.predict(frame)                                      # frame has an equipment_type column
    model.predict(frame, params={"equipment_type": "pump"})   # or the type is given as a parameter

It returns a frame of the same kind (pandas in -> pandas out, polars in -> polars out) with ``score``, ``flag`` and
one ``attr__<sensor>`` column per sensor. Besides `pipelines.registry`, this is the one module importing mlflow:
MLflow requires the class and `set_model` to sit in the logged file itself.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DETECTOR_ARTIFACT = "detector"


class RoMDetectorModel(PythonModel):
    """pyfunc wrapper of a `RoMDetector` folder given as the ``detector`` artifact."""

    def load_context(self, context: Any) -> None:
        from pipelines.detector import RoMDetector

        self.detector = RoMDetector.load(context.artifacts[DETECTOR_ARTIFACT])

    # The hint is pd.DataFrame on purpose: it is one MLflow derives no input schema from, so MLflow does not enforce
    # one (its enforcement accepts pandas only and would refuse a polars frame before predict runs); polars frames
    # are accepted too. The model checks its inputs itself (RoMDetector.score_frame names missing sensors).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        """Score ``model_input`` (pandas or polars frame); params: equipment_type (str), chunk_len (int)."""
        import polars as pl

        params = params or {}
        as_pandas = not isinstance(model_input, pl.DataFrame)
        frame = pl.from_pandas(model_input) if as_pandas else model_input
        out = self.detector.score_frame(frame, params.get("equipment_type") or None,
                                        chunk_len=int(params.get("chunk_len") or 4096))
        return out.to_pandas() if as_pandas else out


mlflow.models.set_model(RoMDetectorModel())
