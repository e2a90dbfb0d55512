"""The registered champion as an MLflow pyfunc model: an evaluation network rebuilt from plain files.

MLflow stores this file with the model ("models from code") and runs it when the model is loaded, so loading
needs no unpickling: the genotype is parsed from JSON text, the architecture from a JSON of arguments, and the
weights are read with ``torch.load(weights_only=True)``. Artifacts (written by ``Lineage.register_champion``):

``weights``  a state_dict of :class:`nas.eval_model.EvalNetwork`, saved with ``torch.save``
``genotype`` ``genotype.json`` (:meth:`nas.genotypes.Genotype.to_json`)
``network``  JSON: in_channels, channels, num_classes, layers, auxiliary, stem, mean, std, image_size

Input: images with pixels in [0, 1], a numpy array (N, C, H, W), or (N, H, W) for one-channel data. Output:
float32 class probabilities (N, num_classes). The logged signature pins float32 (N, C, H, W), which is what
``mlflow.pyfunc`` callers and ``mlflow models serve`` then have to send.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

NETWORK_KEYS = ("in_channels", "channels", "num_classes", "layers", "auxiliary", "stem", "mean", "std", "image_size")


class DartsClassifier(mlflow.pyfunc.PythonModel):
    """Class probabilities from a retrained DARTS evaluation network (CPU, eval mode)."""

    def load_context(self, context: Any) -> None:
        from nas.eval_model import EvalNetwork  # the nas package travels with the model as code_paths
        from nas.genotypes import parse_genotype

        artifacts = context.artifacts
        genotype = parse_genotype(Path(artifacts["genotype"]).read_text())
        spec = json.loads(Path(artifacts["network"]).read_text())
        missing = [key for key in NETWORK_KEYS if key not in spec]
        if missing:
            raise ValueError(f"network artifact lacks {', '.join(missing)}")
        self.in_channels = int(spec["in_channels"])
        self.image_size = int(spec["image_size"])
        self.mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.network = EvalNetwork(
            genotype, in_channels=self.in_channels, channels=int(spec["channels"]),
            num_classes=int(spec["num_classes"]), layers=int(spec["layers"]), auxiliary=bool(spec["auxiliary"]),
            stem=spec["stem"],
        )  # fmt: skip
        state = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
        self.network.load_state_dict(state)
        self.network.eval()

    # np.ndarray is a hint MLflow 3 derives no signature from: the logged tensor signature stays the one that counts.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Softmax probabilities for images in [0, 1], normalised as in training (the stored mean and std)."""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            allowed = "(N, C, H, W)" + (" or (N, H, W)" if self.in_channels == 1 else "")
            raise ValueError(f"expected images {allowed} with (C, H, W) = {expected}, got shape {tuple(x.shape)}")
        with torch.no_grad():
            logits, _ = self.network((x - self.mean) / self.std)
            return torch.softmax(logits, dim=1).numpy().astype(np.float32)


mlflow.models.set_model(DartsClassifier())
