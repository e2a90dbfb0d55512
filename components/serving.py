"""The registered champion as an MLflow pyfunc model: an evaluation network rebuilt from its spec.

MLflow stores this file with the model ("models from code") and runs it when the model is loaded, so loading
needs no unpickling: the network is built from ``spec.json`` (:class:`nas.eval_model.NetworkSpec`: genotype,
sizes, and the training data's mean and std) and the weights are read with ``torch.load(weights_only=True)``.
Artifacts (written by ``Lineage.register_champion``): ``weights`` (a state_dict saved with ``torch.save``) and
``spec`` (the NetworkSpec as JSON).

Input: raw images, (N, C, H, W) or (N, H, W) for one-channel data, as float pixels in [0, 1]; pixels in
[0, 255] are taken with ``params={"pixel_max": 255}`` (uint8 arrays too, when the class is called directly). The
model normalises them as in training. Output: float32 class probabilities (N, num_classes). The logged signature
pins float32 (N, C, H, W), which is what ``mlflow.pyfunc`` callers and ``mlflow models serve`` then send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch


class DartsClassifier(mlflow.pyfunc.PythonModel):
    """Class probabilities from a retrained DARTS evaluation network (CPU, eval mode)."""

    def load_context(self, context: Any) -> None:
        from nas.eval_model import EvalNetwork, NetworkSpec  # the nas package travels with the model as code_paths

        artifacts = context.artifacts
        self.spec = NetworkSpec.model_validate_json(Path(artifacts["spec"]).read_text())
        self.network = EvalNetwork.from_spec(self.spec)
        self.network.load_state_dict(torch.load(artifacts["weights"], map_location="cpu", weights_only=True))
        self.network.eval()

    # np.ndarray is a hint MLflow 3 derives no signature from: the logged tensor signature stays the one that counts.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Softmax probabilities for raw images (pixels up to ``pixel_max``: 1 by default, or 255)."""
        pixel_max = float((params or {}).get("pixel_max", 1.0))
        images = np.asarray(model_input)
        if pixel_max != 1.0 and images.dtype != np.uint8:
            images = images.astype(np.float32) / pixel_max
        with torch.no_grad():
            logits, _ = self.network(self.spec.normalise(images))
            return torch.softmax(logits, dim=1).numpy().astype(np.float32)


mlflow.models.set_model(DartsClassifier())
