"""An image as the training data saw it: a path, PIL image or uint8 array decoded, made RGB and resized."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

_PROG = "jsim-predict"

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def prepare_image(image: ImageLike, image_size: int) -> np.ndarray:
  """uint8 RGB [image_size, image_size, 3] of a path, PIL image or uint8 array, decoded like training data.

  Arrays may be [H, W] (gray), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).
  Raises FileNotFoundError for a missing file and ValueError for anything that is not an image.
  """
  from jsim.data import tiny_imagenet

  if isinstance(image, (str, os.PathLike)):
    path = Path(image)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
      raise ValueError(f"{path} is a directory, not an image")
    try:
      return tiny_imagenet.decode_image(path.read_bytes(), image_size)[0]
    except UnidentifiedImageError:
      raise ValueError(f"{path}: not a readable image (PIL does not recognise its format)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
      raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, Image.Image):
    try:
      image.load()
      return tiny_imagenet.to_rgb(image, image_size)
    except Exception as e:
      raise ValueError(f"PIL image {image!r} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
      raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    return tiny_imagenet.to_rgb(Image.fromarray(np.ascontiguousarray(arr)), image_size)
  raise ValueError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
