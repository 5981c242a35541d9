"""One entry point to every data source: `load_image_sets(config.data)`.

Sources (`data.source`):
  auto       data.root if set (folder), else data.zip_path (zip), else download
  folder     an unpacked tiny-imagenet-200 folder at data.root
  zip        tiny-imagenet-200.zip at data.zip_path, read without unpacking
  download   the official zip, fetched once into data.cache_dir/downloads and verified
  synthetic  a generated stand-in in the same layout (no download; for demos and tests)
  tfds       a TFDS data set by name (jsim.data.tfds_source)
  cub200, cars196, sop   the metric-learning benchmarks (jsim.data.benchmarks), from data.root

All give {'train': ImageSet, 'test': ImageSet}: 'test' is Tiny ImageNet's val
folder. The folder, zip, download and synthetic sources decode once into the
cache under data.cache_dir and read the cache afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from jsim.data import cache, download, synthetic, tiny_imagenet
from jsim.data.dataset import ImageSet

SOURCES = ("auto", "folder", "zip", "download", "synthetic", "tfds", "cub200", "cars196", "sop")
BENCHMARK_SOURCES = ("cub200", "cars196", "sop")  # jsim.data.benchmarks


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields of the config, with their defaults (configs/default.py uses this)."""
  c = ml_collections.ConfigDict()
  c.source = "folder"  # one of SOURCES (the experiment configs use "auto")
  c.root = ""  # source=folder: path of tiny-imagenet-200/ (or of the folder holding it)
  c.zip_path = ""  # source=zip: path of tiny-imagenet-200.zip
  c.download_url = download.OFFICIAL_URL
  c.download_md5 = download.OFFICIAL_MD5  # '' to skip; with no checksum the zip's structure is checked
  c.download_sha256 = ""
  c.cache_dir = ""  # '' = $JSIM_CACHE or ~/.cache/jsim: decoded arrays, downloads, synthetic data
  c.on_bad_image = "error"  # 'error': stop, naming the file; 'skip': drop it and count it
  c.num_workers = config_dict.placeholder(int)  # decoding processes; None = os.cpu_count()
  c.image_size = 64  # images of another size are resized (PIL bilinear)
  c.tfds_name = "jsim_tiny_imagenet"  # the builder in jsim.data.tfds_source
  c.tfds_data_dir = ""
  c.tfds_train_split = "train"
  c.tfds_test_split = "test"
  c.seen_test_fraction = 0.2  # cub200 / cars196 / sop: share of each seen class held out as test images
  c.benchmark_format = "archive"  # cub200 / cars196 / sop: archive (the official files) | tfds (TFDS's builder)
  c.synthetic = ml_collections.ConfigDict(
    dict(num_classes=20, train_per_class=100, test_per_class=20, image_size=64, seed=0, grayscale_fraction=0.02)
  )
  return c


def resolve_source(data_config) -> str:
  """data.source, with 'auto' resolved: root if set, else zip_path if set, else download."""
  if data_config.source != "auto":
    return data_config.source
  if data_config.root:
    return "folder"
  if data_config.zip_path:
    return "zip"
  return "download"


def synthetic_root(data_config) -> Path:
  """Where the synthetic source keeps its generated folder (a function of its parameters)."""
  params = _synthetic_params(data_config)
  key = cache.digest([synthetic.GENERATOR_VERSION, sorted(params.items())])
  return cache.resolve_cache_dir(data_config.cache_dir) / f"synthetic-{key[:16]}"


def _synthetic_params(data_config) -> dict[str, Any]:
  return {k: data_config.synthetic[k] for k in default_data_config().synthetic.keys()}


def ensure_synthetic(data_config) -> Path:
  """Generates the synthetic folder once (atomically) and returns its path."""
  root = synthetic_root(data_config)
  if not (root / synthetic.INFO_FILE).exists():
    params = _synthetic_params(data_config)
    images = params["num_classes"] * (params["train_per_class"] + params["test_per_class"])
    # Starting a process costs about as much as rendering ~1000 images: small sets render here.
    workers = min(data_config.num_workers or os.cpu_count() or 1, max(1, images // 2000))
    with cache.atomic_dir(root) as tmp:
      synthetic.write_synthetic_tiny_imagenet(tmp, **params, num_workers=workers)
  return root


def load_image_sets_and_report(data_config) -> tuple[dict[str, ImageSet], dict[str, Any]]:
  """Like load_image_sets, and also returns the load report (counts, skipped files, cache use)."""
  d = data_config
  source = resolve_source(d)
  if source == "tfds":
    from jsim.data import tfds_source  # lazy: TFDS is heavy and optional

    sets = tfds_source.load_image_sets(d)
    return sets, {
      "source": "tfds",
      "location": d.tfds_name,
      "num_images": {k: len(v) for k, v in sets.items()},
      "num_classes": len(next(iter(sets.values())).class_ids),
    }
  if source in BENCHMARK_SOURCES:
    from jsim.data import benchmarks

    return benchmarks.load(source, d)
  options = dict(image_size=d.image_size, on_bad_image=d.on_bad_image, num_workers=d.num_workers, cache_dir=d.cache_dir)
  if source == "folder":
    return tiny_imagenet.load_folder(d.root, **options)
  if source == "zip":
    return tiny_imagenet.load_zip(d.zip_path, **options)
  if source == "download":
    path = download.fetch(d.download_url, _download_dest(d), sha256=d.download_sha256, md5=d.download_md5)
    return tiny_imagenet.load_zip(path, **options)
  if source == "synthetic":
    return tiny_imagenet.load_folder(ensure_synthetic(d), **options)
  raise ValueError(f"data.source={source!r} must be one of {SOURCES}")


def _download_dest(d) -> Path:
  return cache.resolve_cache_dir(d.cache_dir) / "downloads" / (d.download_url.rsplit("/", 1)[-1] or "data.zip")


# Tiny ImageNet's official archive: its images (100,000 train + 10,000 val), for the size of a cache entry.
_OFFICIAL_IMAGES = 110_000


def probe_image_sets(data_config) -> tuple[dict[str, Any] | None, list[str]]:
  """What `load_image_sets` would read and write, found without decoding the data or writing anything.

  For `--dry_run`: ({'train', 'test'}: ImageSets from the cache, LabelSets (labels and ids, nothing
  decoded) when the cache has no entry yet, or None when the data is still to be downloaded; lines
  saying where the data is, what the run will write into the cache and whether it fits). The folder
  and zip layouts are read in full and a sample of images decoded; the synthetic source, when not
  generated yet, is drawn into a temporary folder that is removed. TFDS and the benchmark archives
  are loaded as the run loads them (their first load writes into the cache, and a line says so).
  """
  import tempfile

  d = data_config
  source = resolve_source(d)
  options = dict(image_size=d.image_size, on_bad_image=d.on_bad_image, cache_dir=d.cache_dir)
  if source == "tfds" or source in BENCHMARK_SOURCES:
    sets = load_image_sets(d)
    note = "the dry run loads this source as the run does: its first load writes the cache entry"
    return sets, [f"cache:  {note}"] if source in BENCHMARK_SOURCES else []
  if source == "download":
    dest = _download_dest(d)
    if not dest.is_file():
      official = d.download_url == download.OFFICIAL_URL
      entry = _OFFICIAL_IMAGES * (d.image_size * d.image_size * 3 + 4) if official else 0
      needed = (download.OFFICIAL_SIZE if official else 0) + entry
      root = cache.resolve_cache_dir(d.cache_dir)
      free = cache.check_free_space(root, needed, f"downloading {d.download_url} and decoding it")
      size = f" ({download.OFFICIAL_SIZE / 1e6:.0f} MB, then {entry / 1e9:.2f} GB decoded)" if official else ""
      return None, [
        f"data:   not downloaded yet: the run downloads {d.download_url} into {dest}{size}; "
        f"{free / 1e9:.1f} GB free there",
        "split:  checked once the data is there (the dry run downloads nothing)",
      ]
    src = tiny_imagenet.Zip(dest)
  elif source == "folder":
    src = tiny_imagenet.Folder(d.root)
  elif source == "zip":
    src = tiny_imagenet.Zip(d.zip_path)
  elif source == "synthetic":
    root = synthetic_root(d)
    if not (root / synthetic.INFO_FILE).exists():
      params = _synthetic_params(d)
      with tempfile.TemporaryDirectory(prefix="jsim-dry-run-") as tmp:
        sets, report = tiny_imagenet.probe(
          tiny_imagenet.Folder(synthetic.write_synthetic_tiny_imagenet(Path(tmp) / "data", **params)), **options
        )
      return sets, [
        f"cache:  the run draws the synthetic images into {root} and decodes them into the cache "
        f"({report['bytes'] / 1e6:.0f} MB; {report['free'] / 1e9:.1f} GB free)"
      ]
    src = tiny_imagenet.Folder(root)
  else:
    raise ValueError(f"data.source={source!r} must be one of {SOURCES}")
  sets, report = tiny_imagenet.probe(src, **options)
  if report["cached"]:
    return sets, [f"cache:  decoded already ({report['cache_path']})"]
  return sets, [
    f"cache:  the run decodes the images into {report['cache_path']} ({report['bytes'] / 1e6:,.0f} MB; "
    f"{report['free'] / 1e9:.1f} GB free); the dry run decoded {report['sampled']} of them as a check"
  ]


def load_image_sets(data_config) -> dict[str, ImageSet]:
  """Loads {'train': ImageSet, 'test': ImageSet} as `data_config.source` says (see the module doc)."""
  return load_image_sets_and_report(data_config)[0]


def class_names(data_config, class_ids: tuple[str, ...]) -> list[str]:
  """A readable name per class id: the first name of words.txt ('n01443537' -> 'goldfish'), else the id.

  For the folder, zip, download and synthetic sources (TFDS ids are names already).
  """
  d = data_config
  source = resolve_source(d)
  words: dict[str, str] = {}
  try:
    if source in ("folder", "synthetic"):
      text = tiny_imagenet.Folder(d.root if source == "folder" else synthetic_root(d)).read("words.txt")
    elif source in ("zip", "download"):
      path = (
        d.zip_path
        if source == "zip"
        else cache.resolve_cache_dir(d.cache_dir) / "downloads" / (d.download_url.rsplit("/", 1)[-1] or "data.zip")
      )
      text = tiny_imagenet.Zip(path).read("words.txt")
    else:
      text = b""
    for line in text.decode(errors="replace").splitlines():
      wnid, _, name = line.partition("\t")
      words[wnid.strip()] = name.split(",")[0].strip()
  except (OSError, ValueError, KeyError):  # no words.txt: the ids it is
    pass
  return [words.get(c) or c for c in class_ids]
