import os

# Tests talk to loopback only: the hub client must never try the network (the servers the tests start
# inherit this too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest

from flux.pipeline import KontextEditor
from flux.tiny import write_tiny_model


def make_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A structured RGB test image: smooth gradients plus a few solid rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 17.0)], axis=-1) * 255
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    return PIL.Image.fromarray(img.astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="session")
def editor(tiny_dir):
    return KontextEditor.from_pretrained(tiny_dir, device="cpu")
