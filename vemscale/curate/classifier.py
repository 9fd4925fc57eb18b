"""An optional learned filter: CEM500K's patch-quality classifier (a user's weights file), scoring 8-bit patches.

The architecture is CEM500K's (`dataset/classify_patches.py`, `train_patch_classifier.py`): torchvision
ResNet-34 whose `fc` is `Linear(512, 1)`, a sigmoid output = probability the patch is informative, input
224 x 224 grey repeated to RGB and normalised with ImageNet statistics (albumentations `Normalize()` defaults).
Weights come from the user (e.g. CEM500K's released `patch_quality_classifier_nn.pth`), never downloaded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vemscale.errors import UserError

INPUT = 224  # CEM500K classify_patches.py: Resize(224, 224)
MEAN = (0.485, 0.456, 0.406)  # albumentations Normalize() defaults, as CEM500K classify_patches.py uses
STD = (0.229, 0.224, 0.225)
BATCH = 128  # CEM500K classify_patches.py: batch size 128


def build_classifier():  # noqa: ANN201 - a torch module
    import torch
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    model.fc = torch.nn.Linear(512, 1)  # CEM500K train_patch_classifier.py: one logit
    return model


def load_classifier(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function (N, H, W) uint8 patches -> (N,) probabilities of 'informative'; UserError for a bad file."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"classifier {path!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - a file that is not a torch state dict
        raise UserError(f"classifier {path!r} is not a torch weights file: {type(err).__name__}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"classifier {path!r} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_classifier()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (want {tuple(v.shape)})" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise UserError(f"classifier {path!r} is not a ResNet-34 with a 1-output fc (CEM500K's patch classifier): "
                        f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected keys "
                        f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}, wrong shapes {shapes[:4]}")
    model.load_state_dict(state)
    model.eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def score(patches: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(patches), BATCH):
                x = torch.from_numpy(np.ascontiguousarray(patches[i : i + BATCH])).float().div(255.0)[:, None]
                if x.shape[-2:] != (INPUT, INPUT):
                    x = torch.nn.functional.interpolate(x, size=(INPUT, INPUT), mode="bilinear", align_corners=False)
                x = (x.repeat(1, 3, 1, 1) - mean) / std
                out.append(torch.sigmoid(model(x)[:, 0]).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    return score
