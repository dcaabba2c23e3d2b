"""PNG grids of synthetic images: one row per class, subsets left to right."""

from __future__ import annotations

import numpy as np
from PIL import Image


def save_grid(path: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
              max_classes: int = 100, scale: int = 0) -> None:
  """Writes `images` (N,H,W,C in [0,1]) as a grid; rows = classes (first
  `max_classes`), columns = that class's images in set order."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  labels = np.asarray(labels)
  h, w, c = images.shape[1:]
  rows = min(num_classes, max_classes)
  cols = max(int(np.sum(labels == k)) for k in range(rows))
  pad = 1
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for r in range(rows):
    for j, i in enumerate(np.flatnonzero(labels == r)):
      y, x = pad + r * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = images[i]
  scale = scale or max(1, 64 // max(h, w))
  pixels = (grid * 255).round().astype(np.uint8)
  img = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)
