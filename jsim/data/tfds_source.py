"""TensorFlow Datasets side of the data layer, usable without TensorFlow.

Two things live here:

* `JsimTinyImagenet`, a TFDS builder (registered as 'jsim_tiny_imagenet') that
  turns the official Tiny ImageNet layout -- a folder or the
  `tiny-imagenet-200.zip` archive -- into array_record files. It reads the files
  with jsim.data.tiny_imagenet (zipfile + PIL) because TFDS archive extraction and TFRecord need
  TensorFlow, which jsim does not install.
* `load_image_sets(data_config)`, which reads the 'train' and 'test' parts of any
  TFDS data set prepared as array_record (this builder, 'cars196', ...) with
  `tfds.data_source` into `ImageSet`s, decoding the images with PIL in parallel
  chunks.

Prepare Tiny ImageNet once (no download; `source` is the folder or the zip):

    python -m jsim.data.tfds_source --source ~/data/tiny-imagenet-200 \
        --data_dir ~/tensorflow_datasets

or in Python: `prepare_tiny_imagenet(source, data_dir)`, or the TFDS way:
`tfds.builder('jsim_tiny_imagenet', data_dir=..., source=...)
.download_and_prepare(file_format='array_record')`.

Stored images: the original JPEG bytes of each file, untouched, so decoding them
gives exactly the pixels of the file. Grayscale JPEGs (about 2% of Tiny
ImageNet) stay single-channel JPEGs on disk; the feature is declared
(64, 64, 3) and every decoder -- TFDS's own (TF, OpenCV or PIL) and
`tiny_imagenet.decode_image` -- replicates the gray channel into RGB. Only an image that
is neither 8-bit RGB/gray nor 64x64 is converted to RGB, resized (bilinear) and
re-encoded (JPEG, quality 95); the real Tiny ImageNet has none.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jsim.data import tiny_imagenet
from jsim.data.dataset import ImageSet
from jsim.data.tiny_imagenet import ON_BAD_IMAGE

log = logging.getLogger(__name__)

TINY_IMAGENET_NAME = "jsim_tiny_imagenet"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_SIZE = 64
# Features that may hold a per-image name, in order of preference.
_ID_KEYS = ("image_id", "id", "file_name", "filename", "image/filename", "image_name", "name")


# ----------------------------------------------------------------------------------------------
# The builder.


def _tiny_imagenet_bytes(data: bytes, name: str) -> bytes:
  """Checks that `data` decodes; returns it unchanged unless it must be converted (see module doc)."""
  with Image.open(io.BytesIO(data)) as im:
    im.load()  # Decode fully: a truncated file fails here, not at training time.
    if im.mode in ("RGB", "L") and im.size == (TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE):
      return data
    log.warning("%s is %s %s, not 64x64 RGB/gray: converting and re-encoding it", name, im.mode, im.size)
    im = Image.fromarray(tiny_imagenet.to_rgb(im, TINY_IMAGENET_SIZE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@contextlib.contextmanager
def _tfds_scratch():
  """Where TFDS's temporary folders go while a builder is made: one folder, removed after. TFDS makes an empty
  one (tmp*tfds, DatasetInfo.initialize_from_bucket, with GCS off too) for every builder of a data set not yet
  prepared, and never removes it."""
  with tempfile.TemporaryDirectory(prefix="jsim-tfds-") as scratch:
    before, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = before


class JsimTinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet (tiny-imagenet-200) for jsim: 'train' = train folder, 'test' = val folder.

  The files are read, and checked, by jsim.data.tiny_imagenet (the reader of the
  folder and zip sources), so both routes accept and refuse the same data.

  Builder kwargs (besides TFDS's data_dir, file_format...):
    source: the folder or zip to read (see `tiny_imagenet.open_layout`). Default: the
      manual dir (`<data_dir>/downloads/manual`, or `DownloadConfig.manual_dir`).
    allow_download: only if True and neither `source` nor a manual dir holds the
      data, download the official zip from the CS231n site.
    on_bad_image: 'error' (default: ValueError naming the file) or 'skip' (with a
      warning) an image that does not decode, or a file the layout cannot label.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEG bytes; 'train' = train folder, 'test' = val folder."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) or its unpacked "
    "tiny-imagenet-200/ folder in the manual dir, or pass source=<folder or zip> to the builder."
  )

  def __init__(
    self,
    *,
    source: str | os.PathLike | None = None,
    allow_download: bool = False,
    on_bad_image: str = "error",
    **kwargs: Any,
  ):
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f"on_bad_image={on_bad_image!r} must be one of {ON_BAD_IMAGE}")
    self._source = None if source is None else os.fspath(source)
    self._allow_download = allow_download
    self._on_bad_image = on_bad_image
    with _tfds_scratch():
      super().__init__(**kwargs)
    # DatasetBuilder pickles by re-running __init__ with this dict.
    self._original_state.update(source=self._source, allow_download=allow_download, on_bad_image=on_bad_image)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the `importlib_resources` package for a builder
    # that lives in a package; the answer is simply this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # The class names come from wnids.txt at preparation time (_split_generators);
    # when reading, TFDS restores them from the prepared folder (label.labels.txt).
    label = tfds.features.ClassLabel()
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Tiny ImageNet (tiny-imagenet-200): 64x64 RGB images of 200 ImageNet classes. "
        "'train' is the train folder (500 per class), 'test' the labelled val folder "
        "(50 per class). Labels index the sorted WordNet ids of wnids.txt; image_id is "
        "the file name."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE, 3), encoding_format="jpeg"),
          "label": label,
          "image_id": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="http://cs231n.stanford.edu/",
      # Keep the layout's order (classes sorted, then file names sorted) on disk.
      disable_shuffling=True,
    )

  def _locate(self, dl_manager: tfds.download.DownloadManager):
    if self._source is not None:
      return tiny_imagenet.open_layout(self._source)
    try:
      manual = dl_manager.manual_dir  # Raises when absent or empty.
    except (AssertionError, ValueError):
      manual = None
    if manual is not None:
      return tiny_imagenet.open_layout(os.fspath(manual))
    if not self._allow_download:
      raise FileNotFoundError(
        f"{TINY_IMAGENET_NAME}: no data to prepare. Pass source=<tiny-imagenet-200 folder or zip>, "
        f"put it in the manual dir, or pass allow_download=True to fetch {TINY_IMAGENET_URL}"
      )
    # Download only (no extraction: that path needs TensorFlow); the zip is read directly.
    return tiny_imagenet.open_layout(os.fspath(dl_manager.download(TINY_IMAGENET_URL)))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    layout = self._locate(dl_manager)
    index = tiny_imagenet.build_index(layout, self._on_bad_image)
    for skipped in index.skipped:
      log.warning("skipping %s: %s", skipped["file"], skipped["reason"])
    # Set the class names before any example is encoded.
    self.info.features["label"].names = list(index.class_ids)
    return {part: self._generate_examples(layout, index, part) for part in tiny_imagenet.PARTS}

  def _generate_examples(self, layout, index, part: str) -> Iterator[tuple[str, dict]]:
    read = layout.open()
    for rel, label, name in zip(index.files[part], index.labels[part], index.image_ids[part]):
      data = read(rel)  # A missing file is an error whatever on_bad_image says.
      try:
        data = _tiny_imagenet_bytes(data, rel)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        if self._on_bad_image == "error":
          raise ValueError(f"cannot decode {layout.describe(rel)}: {e}") from e
        log.warning("skipping %s: %s", layout.describe(rel), e)
        continue
      yield name, {"image": data, "label": label, "image_id": name}


def prepare_tiny_imagenet(
  source: str | os.PathLike | None,
  data_dir: str | os.PathLike | None = None,
  *,
  allow_download: bool = False,
  on_bad_image: str = "error",
) -> tfds.core.DatasetBuilder:
  """Prepares 'jsim_tiny_imagenet' (array_record) in `data_dir` from a folder or zip; returns the builder.

  A no-op when it is already prepared there.
  """
  builder = JsimTinyImagenet(
    data_dir=None if data_dir is None else os.fspath(data_dir),
    source=source,
    allow_download=allow_download,
    on_bad_image=on_bad_image,
  )
  builder.download_and_prepare(file_format="array_record")
  return builder


# ----------------------------------------------------------------------------------------------
# Reading any TFDS data set prepared as array_record.


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """One split of a prepared TFDS data set, with what jsim needs to read it.

  Attributes:
    source: the `tfds.data_source` of the split; images come back undecoded
      (bytes), every other feature decoded.
    class_ids: class names sorted (ClassLabel names; str(i) when unnamed, kept
      in numeric order).
    label_map: int32 [num TFDS labels]: TFDS label -> index into class_ids.
    image_key, label_key: the features holding the image and the ClassLabel.
    id_key: the Text feature naming each image, or None.
  """

  name: str
  split: str
  source: Sequence[dict]
  class_ids: tuple[str, ...]
  label_map: np.ndarray
  image_key: str
  label_key: str
  id_key: str | None

  def __len__(self) -> int:
    return len(self.source)


def _not_prepared(name: str, data_dir: str | None, why: str) -> FileNotFoundError:
  where = data_dir or "the default TFDS data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
  if name == TINY_IMAGENET_NAME:
    how = f"python -m jsim.data.tfds_source --source <tiny-imagenet-200 folder or zip> --data_dir {data_dir or '<dir>'}"
  else:
    how = (
      f"tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare(file_format='array_record') "
      "(if its preparation needs TensorFlow, run that where TF is installed and copy the folder)"
    )
  return FileNotFoundError(
    f"TFDS data set {name!r} is not usable in {where}: {why}. Prepare it with: {how}. "
    "This machine has no TensorFlow, so only array_record-prepared data sets can be read "
    "(not TFRecord)."
  )


def _pick_key(features, cls, preferred: Sequence[str], what: str, name: str, required: bool = True):
  keys = [k for k, f in features.items() if isinstance(f, cls)]
  for k in preferred:
    if k in keys:
      return k
  if len(keys) == 1 or (keys and not required):
    return keys[0]
  if not required:
    return None
  raise ValueError(
    f"TFDS data set {name!r} has {len(keys)} top-level {what} features {keys}; "
    f"jsim needs exactly one (or one named {preferred[0]!r})"
  )


def open_tfds_split(name: str, split: str, data_dir: str | os.PathLike | None = None) -> TfdsSplit:
  """Opens one split of an array_record-prepared TFDS data set for random access.

  Raises FileNotFoundError (one line, saying how to prepare it) when the data
  set is unknown, not prepared in `data_dir`, or prepared only as TFRecord.
  """
  data_dir = None if data_dir is None else os.fspath(Path(data_dir).expanduser())
  try:
    with _tfds_scratch():
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _not_prepared(name, data_dir, f"unknown data set ({str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    raise _not_prepared(name, data_dir, f"not prepared (no {builder.data_dir})")
  formats = {builder.info.file_format} | set(getattr(builder.info, "alternative_file_formats", ()) or ())
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
    raise _not_prepared(
      name, data_dir, f"prepared as {sorted(str(f.value) for f in formats if f)} in " + str(builder.data_dir)
    )
  features = builder.info.features
  # Slices and sums ('train[:80%]', 'train+test') are TFDS's to parse; check the names only.
  for part in split.split("+"):
    if part.split("[")[0].strip() not in builder.info.splits:
      raise ValueError(f"TFDS data set {name!r} has no split {part!r} (it has {sorted(builder.info.splits)})")
  image_key = _pick_key(features, tfds.features.Image, ("image",), "Image", name)
  label_key = _pick_key(features, tfds.features.ClassLabel, ("label", "class_id"), "ClassLabel", name)
  id_key = _pick_key(features, tfds.features.Text, _ID_KEYS, "Text", name, required=False)
  if id_key is not None and id_key not in _ID_KEYS:
    id_key = None  # A lone Text feature need not name the image (e.g. a caption).
  # Skip TFDS's decoding of every image feature: we decode with PIL ourselves,
  # and other images (e.g. segmentation masks) are not needed at all.
  decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, tfds.features.Image)}
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  names = list(features[label_key].names or [str(i) for i in range(features[label_key].num_classes)])
  # ImageSet wants class ids sorted; unnamed classes ('0', '1', ...) keep numeric order.
  order = (
    list(range(len(names))) if all(n.isdigit() for n in names) else sorted(range(len(names)), key=lambda i: names[i])
  )
  label_map = np.empty(len(names), np.int32)
  label_map[order] = np.arange(len(names), dtype=np.int32)
  return TfdsSplit(
    name=name,
    split=split,
    source=source,
    class_ids=tuple(names[i] for i in order),
    label_map=label_map,
    image_key=image_key,
    label_key=label_key,
    id_key=id_key,
  )


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def read_image_set(
  ts: TfdsSplit,
  image_size: int | None,
  *,
  on_bad_image: str = "error",
  num_threads: int | None = None,
  chunk_size: int = 512,
) -> ImageSet:
  """Decodes a whole TFDS split into an ImageSet, in parallel chunks of `chunk_size` records.

  image_size: side of the output images (None: all images must share one size).
  on_bad_image: 'error' (ValueError naming the image) or 'skip' it with a warning.
  """
  n = len(ts)
  if image_size is None and n:
    image_size = tiny_imagenet.decode_image(ts.source[0][ts.image_key], None)[0].shape[0]
  images = np.zeros((n, image_size, image_size, 3), np.uint8)
  labels = np.zeros(n, np.int32)
  ids: list[str] = [""] * n
  ok = np.ones(n, bool)

  def work(start: int) -> None:
    stop = min(start + chunk_size, n)
    records = ts.source.__getitems__(list(range(start, stop)))
    for i, rec in zip(range(start, stop), records):
      ids[i] = _text(rec[ts.id_key]) if ts.id_key else f"{ts.split}/{i}"
      labels[i] = ts.label_map[int(rec[ts.label_key])]
      try:
        img = tiny_imagenet.decode_image(rec[ts.image_key], image_size)[0]
        if img.shape != images.shape[1:]:
          raise ValueError(f"size {img.shape} differs from the first image's {images.shape[1:]}")
        images[i] = img
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        if on_bad_image == "error":
          raise ValueError(f"{ts.name}/{ts.split}: cannot decode image {i} ({ids[i]}): {e}") from e
        log.warning("%s/%s: skipping image %d (%s): %s", ts.name, ts.split, i, ids[i], e)
        ok[i] = False

  workers = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for f in [pool.submit(work, s) for s in range(0, n, chunk_size)]:
      f.result()  # Re-raises the first error.
  if ts.id_key and len(set(ids)) != n:
    log.warning("%s/%s: %r does not name images uniquely; using '<split>/<index>' ids", ts.name, ts.split, ts.id_key)
    ids = [f"{ts.split}/{i}" for i in range(n)]
  if not ok.all():
    keep = np.flatnonzero(ok)
    images, labels, ids = images[keep], labels[keep], [ids[i] for i in keep]
  return ImageSet(images=images, labels=labels, class_ids=ts.class_ids, image_ids=tuple(ids))


def load_image_sets(data_config: Any) -> dict[str, ImageSet]:
  """Reads the 'train' and 'test' ImageSets of a TFDS data set (data_config.source == 'tfds').

  Fields used: tfds_name (e.g. 'jsim_tiny_imagenet', 'cars196'), tfds_data_dir ('':
  TFDS's default), tfds_train_split, tfds_test_split, image_size, on_bad_image
  ('error'|'skip'), num_workers (decoding threads; None: one per CPU core).
  Both parts share the class ids of the data set's ClassLabel (sorted); image
  ids come from an id feature ('image_id', 'id', 'file_name', ...) if present,
  else '<split>/<index>'.
  """
  d = data_config
  if not d.tfds_name:
    raise ValueError("data.tfds_name must name a TFDS data set (e.g. 'jsim_tiny_imagenet', 'cars196')")
  num_threads = d.num_workers or os.cpu_count() or 1
  splits = {"train": d.tfds_train_split, "test": d.tfds_test_split}
  out = {}
  for part, split in splits.items():
    ts = open_tfds_split(d.tfds_name, split, d.tfds_data_dir or None)
    out[part] = read_image_set(ts, d.image_size, on_bad_image=d.on_bad_image, num_threads=num_threads)
    log.info("%s[%s] -> %s: %d images", d.tfds_name, split, part, len(out[part]))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: prepare 'jsim_tiny_imagenet' from a folder or zip."""
  p = argparse.ArgumentParser(
    description="Prepare Tiny ImageNet as the TFDS data set "
    f"{TINY_IMAGENET_NAME!r} (array_record, no TensorFlow needed)."
  )
  p.add_argument("--source", default=None, help="tiny-imagenet-200 folder or zip (default: the manual dir)")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--allow_download", action="store_true", help=f"download {TINY_IMAGENET_URL} if no source")
  p.add_argument("--on_bad_image", default="error", choices=ON_BAD_IMAGE)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  builder = prepare_tiny_imagenet(
    args.source, args.data_dir, allow_download=args.allow_download, on_bad_image=args.on_bad_image
  )
  print(
    f"{TINY_IMAGENET_NAME} prepared in {builder.data_dir}: "
    + ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  )


if __name__ == "__main__":
  main()
