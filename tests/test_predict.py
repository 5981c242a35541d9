"""jsim.predict through its real command line (subprocess) and its Python API, on a tiny trained workdir.

The workdir is conftest's `trained` (configs/tiny.py, trained once per test run and shared).
The strong check is that an image file gives, through the command line, the same
embedding the training pipeline stored for it (W/embeddings/test.npy) and the same
P(same) that Ms gives on those stored embeddings: preprocessing matches training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import Trained, gallery_folder, predict_cli, predict_cli_json


# ----------------------------------------------------------------------------- two images


@pytest.mark.parametrize("same", [True, False])
def test_pair_matches_api_and_stored_embeddings(trained, sim, ms_reference, same):
  i, j = trained.rows(same, start=0 if same else 1)
  a, b = trained.files[i], trained.files[j]
  out, _ = predict_cli_json(f"--workdir={trained.workdir}", a, b)
  p = out["probability"]
  assert 0.0 <= p <= 1.0
  assert out["same_at_0.5"] == (p > 0.5)
  assert out["val_threshold"] == pytest.approx(trained.threshold)
  assert out["same_at_val_threshold"] == (p > trained.threshold)
  # The Python API, and Ms (restored by the trainer's code) on the embeddings training stored for these files.
  assert sim.probability(a, b) == pytest.approx(p, abs=1e-6)
  assert ms_reference(trained.test[i], trained.test[j])[0] == pytest.approx(p, abs=1e-5)
  e = sim.embed([a, b])
  scale = np.abs(trained.test).max()
  np.testing.assert_allclose(e, trained.test[[i, j]], atol=1e-5 * scale)


def test_png_grayscale_rgba_palette_and_odd_sizes(trained, sim, tmp_path):
  from jsim import predict
  from jsim.data import tiny_imagenet

  i, j = trained.rows(True)
  src_a = Image.open(trained.files[i])
  src_b = Image.open(trained.files[j])
  gray = tmp_path / "gray.png"
  src_a.convert("L").resize((45, 37), Image.BICUBIC).save(gray)
  rgba = tmp_path / "rgba odd.png"
  rgba_im = src_b.convert("RGBA").resize((50, 71), Image.BICUBIC)
  rgba_im.putalpha(128)
  rgba_im.save(rgba)
  palette = tmp_path / "palette.gif"
  src_b.convert("P", palette=Image.ADAPTIVE).save(palette)
  size = sim.image_size
  for path in (gray, rgba, palette):
    x = predict.prepare_image(path, size)
    # The data layer's decode of the same bytes: convert to RGB, PIL bilinear to the training size.
    np.testing.assert_array_equal(x, tiny_imagenet.decode_image(path.read_bytes(), size)[0])
    assert x.shape == (size, size, 3) and x.dtype == np.uint8
    # PIL images and uint8 arrays go the same way as the file.
    np.testing.assert_array_equal(predict.prepare_image(Image.open(path), size), x)
    np.testing.assert_array_equal(
      predict.prepare_image(
        np.asarray(Image.open(path).convert("RGBA" if path == rgba else "L" if path == gray else "RGB")), size
      ),
      x,
    )

  r = predict_cli(f"--workdir={trained.workdir}", gray, rgba)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  p = float(lines[0].split("=")[1].split()[0])
  expected = sim.probability(gray, rgba)
  assert 0.0 <= expected <= 1.0 and p == pytest.approx(expected, abs=1e-4)
  assert lines[1].endswith("yes" if expected > 0.5 else "no")
  assert "validation threshold" in lines[2] and lines[2].endswith("yes" if expected > trained.threshold else "no")
  assert sim.probability(np.asarray(Image.open(rgba)), Image.open(gray)) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- gallery search


def test_gallery_search_ranks_caches_and_invalidates(trained, sim, ms_reference, tmp_path):
  gal, rows = gallery_folder(trained, tmp_path)
  query = trained.files[0]
  html, sheet = tmp_path / "out" / "page.html", tmp_path / "out" / "sheet.png"
  (tmp_path / "out").mkdir()  # (a missing folder is refused, not made)
  # The JAX backend, whose cache `sim` (loaded with it) shares; test_predict_onnx.py covers the ONNX one's.
  args = (f"--workdir={trained.workdir}", f"--query={query}", f"--gallery={gal}", "--backend=jax")

  first, err = predict_cli_json(*args, "--top=0", f"--html={html}", f"--sheet={sheet}")
  probs = [m["probability"] for m in first["results"]]
  assert [m["rank"] for m in first["results"]] == list(range(1, len(rows) + 1))
  assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
  got = {Path(m["path"]).relative_to(gal).as_posix(): m["probability"] for m in first["results"]}
  assert set(got) == set(rows)  # recursive, any case; not .txt, not hidden, not the broken file
  for rel, row in rows.items():
    assert got[rel] == pytest.approx(ms_reference(trained.test[0], trained.test[row])[0], abs=1e-5), rel
  assert first["cache"] == {"reused": 0, "embedded": len(rows), "skipped": ["broken.jpg"]}
  assert f"0 from the cache, {len(rows)} embedded" in err and "broken.jpg" in err
  page = html.read_text()
  assert page.count("data:image/png;base64,") == 1 + len(rows) and "a.jpg" in page
  # Each image links to its file; paths break only after a '/'.
  assert page.count('<a href="file://') == 1 + len(rows) and "word-break: break-all" not in page
  assert f'href="{(gal / "a.jpg").resolve().as_uri()}"' in page
  with Image.open(sheet) as im:
    assert im.format == "PNG" and im.width > 200
  cache = sim.cache_path(gal)
  assert cache.exists()
  stamp = cache.stat().st_mtime_ns

  # Second run: nothing embedded again, the cache file is not rewritten, same ranking.
  second, err = predict_cli_json(*args, "--top=3")
  assert second["cache"]["embedded"] == 0 and second["cache"]["reused"] == len(rows)
  assert f"{len(rows)} from the cache, 0 embedded" in err
  assert cache.stat().st_mtime_ns == stamp
  assert [(m["path"], m["probability"]) for m in second["results"]] == [
    (m["path"], m["probability"]) for m in first["results"][:3]
  ]
  api = sim.search(query, gal, top=3)
  assert [m.path for m in api] == [m["path"] for m in second["results"]]
  np.testing.assert_allclose([m.probability for m in api], [m["probability"] for m in second["results"]], atol=1e-6)

  # Change the folder: one file modified (another image), one added, one removed.
  shutil.copyfile(trained.files[8], gal / "a.jpg")
  st = (gal / "a.jpg").stat()
  os.utime(gal / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  shutil.copyfile(trained.files[9], gal / "sub" / "new.jpg")
  (gal / "b.JPEG").unlink()
  rows.update({"a.jpg": 8, "sub/new.jpg": 9})
  del rows["b.JPEG"]
  third, _ = predict_cli_json(*args, "--top=0")
  assert third["cache"]["embedded"] == 2 and third["cache"]["reused"] == len(rows) - 2
  got = {Path(m["path"]).relative_to(gal).as_posix(): m["probability"] for m in third["results"]}
  assert set(got) == set(rows)
  for rel in ("a.jpg", "sub/new.jpg"):
    assert got[rel] == pytest.approx(ms_reference(trained.test[0], trained.test[rows[rel]])[0], abs=1e-5)

  # Another stage-1 checkpoint: the whole gallery is embedded again.
  changed = dataclasses.replace(sim.backbones[0], checkpoint_stamp=sim.backbones[0].checkpoint_stamp + "-another")
  saved = sim.backbones
  try:
    sim.backbones = [changed]
    assert sim.gallery(gal).embedded == len(rows)
  finally:
    sim.backbones = saved
  assert sim.gallery(gal).embedded == len(rows)  # and back: the cache now holds the other key


def test_search_header_counts_the_images_compared_with_the_query(trained, tmp_path):
  """A query inside the gallery is left out of the ranking, and the header's count says so."""
  gal = tmp_path / "g"
  gal.mkdir()
  for i in range(3):
    shutil.copyfile(trained.files[i], gal / f"{i}.jpg")
  r = predict_cli(
    f"--workdir={trained.workdir}", f"--query={gal / '0.jpg'}", f"--gallery={gal}", "--top=0", "--backend=jax"
  )
  assert r.returncode == 0, r.stderr
  header, _, *rows = r.stdout.splitlines()
  assert f"P(same) with each of the 2 images in {gal} besides the query;" in header, header
  assert len(rows) == 2 and not any(row.endswith("0.jpg") for row in rows), rows
  (gal / "1.jpg").unlink()
  (gal / "2.jpg").unlink()
  r = predict_cli(f"--workdir={trained.workdir}", f"--query={trained.files[1]}", f"--gallery={gal}", "--backend=jax")
  assert r.returncode == 0, r.stderr
  assert f"P(same) with each of 1 image in {gal};" in r.stdout.splitlines()[0], r.stdout


# ----------------------------------------------------------------------------- bad input


def _json_only_copy(w: Path, dst: Path) -> Path:
  """The workdir's records without its checkpoints (enough for the checks that run before JAX)."""
  for f in w.rglob("*.json"):
    if "checkpoints" not in f.parts:
      (dst / f.relative_to(w)).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(f, dst / f.relative_to(w))
  for stage in ("stage1", "stage2"):
    (dst / stage / "checkpoints").mkdir(parents=True, exist_ok=True)
  return dst


def _edit(path: Path, fn) -> None:
  d = json.loads(path.read_text())
  fn(d)
  path.write_text(json.dumps(d))


def _bad_case(name: str, trained: Trained, tmp: Path) -> tuple[list, str]:
  w, a = trained.workdir, trained.files[0]
  if name == "missing image":
    return [f"--workdir={w}", a, tmp / "nope.jpg"], "nope.jpg: no such file"
  if name == "unreadable image":
    (tmp / "text.jpg").write_text("hello")
    return [f"--workdir={w}", a, tmp / "text.jpg"], "text.jpg: not a readable image"
  if name == "missing workdir":
    return [f"--workdir={tmp / 'nowhere'}", a, a], "no such directory"
  if name == "untrained workdir":
    (tmp / "empty").mkdir()
    return [f"--workdir={tmp / 'empty'}", a, a], "preprocessing.json is missing"
  if name == "no stage 2":
    c = _json_only_copy(w, tmp / "c")
    shutil.rmtree(c / "stage2")
    return [f"--workdir={c}", a, a], "stage 2 never ran here"
  if name == "embedding dim mismatch":
    c = _json_only_copy(w, tmp / "c")
    _edit(c / "stage2" / "config.json", lambda d: d["embeddings"][0].update(dim=999))
    return [f"--workdir={c}", a, a], "stage 2 does not match the stage-1 backbone (dim 999"
  if name == "model mismatch":
    c = _json_only_copy(w, tmp / "c")
    _edit(c / "stage2" / "config.json", lambda d: d.update(model="vgg16"))
    return [f"--workdir={c}", a, a], "trained for model 'vgg16'"
  if name == "stale embeddings":
    c = _json_only_copy(w, tmp / "c")
    _edit(c / "embeddings" / "meta.json", lambda d: d.update(stage1_step=d["stage1_step"] + 1))
    return [f"--workdir={c}", a, a], "rerun --config.stage=embed"
  if name == "gallery without images":
    (tmp / "g").mkdir()
    (tmp / "g" / "readme.txt").write_text("x")
    return [f"--workdir={w}", f"--query={a}", f"--gallery={tmp / 'g'}"], "no image files"
  if name == "gallery not a folder":
    return [f"--workdir={w}", f"--query={a}", f"--gallery={a}"], "not a folder"
  # Messages that lead somewhere.
  if name == "negative top":
    return [f"--workdir={w}", f"--query={a}", f"--gallery={a.parent}", "--top=-3"], "--top=-3: must be >= 0"
  if name == "workdir is a file":
    return [f"--workdir={a}", a, a], f"workdir {a} is a file, not a directory"
  if name in ("html under a file", "sheet not an image"):
    (tmp / "g").mkdir()
    shutil.copyfile(a, tmp / "g" / "x.jpg")
    out = f"--html={a}/page.html" if name == "html under a file" else f"--sheet={tmp / 'sheet.txt'}"
    expect = f"{a} is a file, not a directory" if name == "html under a file" else "expected a file name ending in .png"
    return [f"--workdir={w}", f"--query={a}", f"--gallery={tmp / 'g'}", out], expect
  if name == "sheet in a missing folder":
    (tmp / "g").mkdir()
    shutil.copyfile(a, tmp / "g" / "x.jpg")
    out = tmp / "no" / "such" / "m.png"
    return [f"--workdir={w}", f"--query={a}", f"--gallery={tmp / 'g'}", f"--sheet={out}"], (
      f"--sheet={out}: the folder {out.parent} does not exist"
    )
  if name == "one image":
    return [f"--workdir={w}", a], "expected two images"
  raise AssertionError(name)


@pytest.mark.parametrize(
  "name",
  [
    "missing image",
    "unreadable image",
    "missing workdir",
    "untrained workdir",
    "no stage 2",
    "embedding dim mismatch",
    "model mismatch",
    "stale embeddings",
    "gallery without images",
    "gallery not a folder",
    "one image",
    "negative top",
    "workdir is a file",
    "html under a file",
    "sheet not an image",
    "sheet in a missing folder",
  ],
)
def test_bad_input_is_one_line_and_nonzero(trained, tmp_path, name):
  args, expected = _bad_case(name, trained, tmp_path)
  r = predict_cli(*args, timeout=120)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("jsim-predict: ") and expected in lines[0], lines[0]
  assert r.stdout == ""
  if name == "sheet in a missing folder":
    assert not (tmp_path / "no").exists()
  if name in ("html under a file", "sheet not an image"):  # refused before the search: nothing embedded
    assert not (trained.workdir / "predict_cache").exists() or not any(
      str((tmp_path / "g").resolve()) in str(np.load(f)["gallery"])
      for f in (trained.workdir / "predict_cache").glob("*.npz")
    )


def test_sheet_colours_mean_the_decision_and_names_keep_their_extension(trained, tmp_path):
  from jsim.evaluate import figures
  from jsim.predict import Match
  from jsim.predict.cli import short_name, write_sheet

  assert short_name("a_very_long_name_of_a_holiday_photo_2.jpeg") == "a_very_\u2026photo_2.jpeg"
  assert len(short_name("a_very_long_name_of_a_holiday_photo_2.jpeg")) == 20
  assert short_name("short.jpg") == "short.jpg"
  files = trained.files[:3]
  sheet = write_sheet(tmp_path / "s.png", files[0], [Match(str(files[1]), 0.9), Match(str(files[2]), 0.1)], 0.5)
  arr = np.asarray(Image.open(sheet).convert("RGB")).astype(int)

  def count(color):
    return int((np.abs(arr - np.asarray(color)).sum(-1) < 30).sum())

  assert count(figures.ABOVE_COLOR) > 50 and count(figures.BELOW_COLOR) > 50 and count(figures.QUERY_COLOR) > 50
  assert count(figures.SAME_COLOR) == 0  # green means "same class" (ground truth) elsewhere: not used here


def test_html_paths_break_after_a_slash_and_inside_a_name_only_when_it_must():
  """Each name of a path is an inline-block (a line takes it whole or moves it to the next line whole) with its
  '/', and the line-break opportunities between names; the '-' of 'synthetic-...' is inside one of them."""
  from jsim.predict.cli import name_folder

  text = name_folder("/tmp/c/synthetic-50aaa7422fbaa945/val/images/val_0.JPEG")
  assert text.startswith('<span class="path">') and text.endswith("</span>")
  names = re.findall(r"<span>([^<]*)</span>", text)
  assert names == ["/", "tmp/", "c/", "synthetic-50aaa7422fbaa945/", "val/", "images/", "val_0.JPEG"]
  assert text.count("<wbr>") == len(names) - 1 and "</span><wbr><span>" in text
  assert name_folder("a<b>&c.jpg") == '<span class="path"><span>a&lt;b&gt;&amp;c.jpg</span></span>'


_MEASURE_LINES = """<script>
function lines(el, word) {  // the lines that `word`, in a text node of el, spans
  const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const i = n.data.indexOf(word);
    if (i < 0) continue;
    const r = document.createRange();
    r.setStart(n, i);
    r.setEnd(n, i + word.length);
    return new Set([...r.getClientRects()].map((x) => Math.round(x.top))).size;
  }
  return 0;
}
const out = {};
for (const word of WORDS) out[word] = [...document.querySelectorAll("figcaption, p")].map((e) => lines(e, word))
  .filter((x) => x > 0);
document.body.setAttribute("data-lines", JSON.stringify(out));
</script></body>"""


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs a headless browser (chromium)")
@pytest.mark.parametrize("width", [1000, 420])
def test_html_page_in_a_browser_breaks_no_name_that_fits(tmp_path, width):
  """The page rendered by headless Chromium: the data cache's 'synthetic-<hash>' folder is never split at its '-'
  where it fits on a line (the query's caption, the matches' folder), at a wide and a narrow window; a name wider
  than its card still wraps."""
  import html as html_lib

  from jsim.predict import Match
  from jsim.predict.cli import write_html

  folder = tmp_path / "synthetic-50aaa7422fbaa945" / "val" / "images"
  folder.mkdir(parents=True)
  names = ["val_0.JPEG", "val_1.JPEG", "a-long-hyphenated-holiday-photo-name.jpeg"]
  for i, name in enumerate(names):
    Image.new("RGB", (16, 16), (40 * i, 90, 160)).save(folder / name, "JPEG")
  page = write_html(
    tmp_path / "m.html", folder / names[0], [Match(str(folder / n), p) for n, p in zip(names[1:], (0.9, 0.2))], 0.5
  )
  words = ["synthetic-50aaa7422fbaa945", names[2]]
  page.write_text(page.read_text().replace("</body>", _MEASURE_LINES.replace("WORDS", json.dumps(words))))
  proc = subprocess.run(
    ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},800", "--dump-dom",
     page.as_uri()],
    capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  m = re.search(r'data-lines="([^"]*)"', proc.stdout)
  assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
  lines = json.loads(html_lib.unescape(m.group(1)))
  assert lines[words[0]] == [1, 1], lines  # the query's caption, then "Best matches in ..."
  assert lines[words[1]][0] > 1, lines  # (the measure sees a wrap: this name is wider than its 140-pixel card)


def test_checkpoint_that_does_not_fit_the_config_is_refused(trained, tmp_path):
  # The records agree, but stage 2's checkpoint has other layer widths than the config now says.
  c = shutil.copytree(trained.workdir, tmp_path / "w", ignore=shutil.ignore_patterns("predict_cache"))
  _edit(c / "stage2" / "config.json", lambda d: d["similarity"].update(hidden=[7]))
  r = predict_cli(f"--workdir={c}", trained.files[0], trained.files[1])
  assert r.returncode == 1 and "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "stage-2 checkpoint does not fit the recorded config" in lines[0], r.stderr


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_workdir_concatenates_member_embeddings(trained, tmp_path):
  """A stage 2 over [this workdir's Mc, a member's Mc]: predict restores both and the wider Ms."""
  import jax
  from jsim.checkpoint import StageCheckpoints
  from jsim.models.similarity import make_prob_fn
  from jsim.train import schedule, similarity

  w2 = shutil.copytree(trained.workdir, tmp_path / "w2", ignore=shutil.ignore_patterns("predict_cache", "stage2"))
  (w2 / "stage2").mkdir()
  stage2 = json.loads((trained.workdir / "stage2" / "config.json").read_text())
  stage2["embeddings"] = stage2["embeddings"] * 2
  stage2["similarity"]["ensemble_workdirs"] = [str(trained.workdir)]
  (w2 / "stage2" / "config.json").write_text(json.dumps(stage2))
  dim = 2 * trained.test.shape[1]
  (w2 / "stage2" / "result.json").write_text(json.dumps({"embedding_dim": dim, "best_step": 0}))
  from jsim import configs

  config = configs.config_from_dict({"similarity": stage2["similarity"], "model": {"dtype": "float32"}})
  config.seed = 3  # weights unlike the trained Ms
  model = similarity.build_similarity(config, dim)
  state = similarity.init_state(config, model, dim, schedule.optimizer_from(config.similarity))
  ckpts = StageCheckpoints(w2 / "stage2" / "checkpoints")
  ckpts.save(0, state, {"best": {"step": 0, "epoch": 1, "val_accuracy": 0.5}}, val_accuracy=0.5)
  ckpts.close()

  i, j = trained.rows(True)
  out, _ = predict_cli_json(f"--workdir={w2}", trained.files[i], trained.files[j])
  e1 = np.concatenate([trained.test[i], trained.test[i]])[None]
  e2 = np.concatenate([trained.test[j], trained.test[j]])[None]
  expected = float(jax.jit(make_prob_fn(model))(state.params, e1, e2)[0])
  assert out["probability"] == pytest.approx(expected, abs=1e-5)


def test_console_script_is_installed(trained, tmp_path):
  script = Path(sys.executable).with_name("jsim-predict")
  if not script.exists():
    pytest.skip("jsim-predict is not installed beside this python")
  r = subprocess.run(
    [str(script), f"--workdir={trained.workdir}", trained.files[0], tmp_path / "missing.png"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1 and r.stderr.strip() == f"jsim-predict: {tmp_path / 'missing.png'}: no such file"
