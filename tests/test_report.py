"""report.json / report.md from a hand-made result, the figures, the sweep comparison table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import drawn_png, write_evaluated_workdir
from jsim.evaluate import figures, report
from jsim.evaluate.pairwise import PairEvalResult


def _result(threshold=0.4, count=(100, 200, 50, 40, 10)):
  """Counts chosen so every number is checkable by hand.

  Positives (cases 1, 4) all in the top bin, negatives (2, 3, 5) in the bottom one,
  except case 5's: half of them in the top bin.
  """
  bins = 10
  count = np.array(count, np.int64)
  hp = np.zeros((5, bins), np.int64)
  hn = np.zeros((5, bins), np.int64)
  hp[0, 9], hp[3, 9] = count[0], count[3]
  hn[1, 0], hn[2, 0] = count[1], count[2]
  hn[4, 0], hn[4, 9] = count[4] // 2, count[4] - count[4] // 2
  return PairEvalResult(
    count=count,
    correct_05=np.array([80, 190, 40, 30, 5]),
    correct_threshold=np.array([90, 180, 45, 32, 6]),
    hist_pos=hp,
    hist_neg=hn,
    threshold=threshold,
    mode="sampled",
    pairs_per_s=1234.0,
  )


def test_report_json_and_markdown(tmp_path):
  res = _result()
  (tmp_path / "figures").mkdir()
  figures.plot_roc(res, tmp_path / "figures" / "roc.png")
  table = report.write_report(
    tmp_path,
    res,
    val_threshold=0.4,
    backbone="resnet50",
    config_dict={"feature": "l1", "lr": 0.005, "hidden": (1024, 512)},
    retrieval={"recall@1": 0.5, "recall@5": 0.75, "mAP": 0.3, "num_queries": 1000},
    extra={"checkpoint_step": 7},
  )
  rep = json.loads((tmp_path / "report.json").read_text())
  assert rep["backbone"] == "resnet50" and rep["num_pairs"] == 400 and rep["val_threshold"] == 0.4
  assert [c["pairs"] for c in rep["cases"]] == [100, 200, 50, 40, 10]
  assert rep["cases"][0]["accuracy_at_0.5"] == pytest.approx(0.80)
  assert rep["cases"][0]["accuracy_at_val_threshold"] == pytest.approx(0.90)
  assert rep["cases"][4]["accuracy_at_0.5"] == pytest.approx(0.5)
  assert rep["cases"][1]["published_accuracy"] == pytest.approx(0.9222)
  assert rep["accuracy_at_0.5"]["overall"] == pytest.approx(345 / 400)
  assert rep["accuracy_at_0.5"]["seen"] == pytest.approx(270 / 300)
  assert rep["accuracy_at_0.5"]["unseen"] == pytest.approx(35 / 50)
  assert rep["accuracy_at_val_threshold"]["overall"] == pytest.approx(353 / 400)
  # Seen: perfectly separated -> AUC 1. Unseen: 40 positives at the top, 10 negatives half
  # at the top (tied: 0.5) and half at the bottom -> 0.5 * 1 + 0.5 * 0.5 = 0.75.
  assert rep["auc"]["seen"] == pytest.approx(1.0) and rep["auc"]["unseen"] == pytest.approx(0.75)
  assert rep["published"]["overall"] == pytest.approx(0.8651) and rep["published"]["unseen"] == pytest.approx(0.738)
  assert rep["published"]["seen"] == pytest.approx(0.8755)  # section 6, not the abstract's rounded 87.5
  assert rep["retrieval"]["recall@5"] == 0.75 and rep["config"]["hidden"] == [1024, 512]
  assert rep["extra"] == {"checkpoint_step": 7}
  md = (tmp_path / "report.md").read_text()
  assert table in md
  row1 = next(line for line in table.splitlines() if line.startswith("| 1."))
  assert "| 100 |" in row1 and "80.00 %" in row1 and "90.00 %" in row1 and "83.36 %" in row1
  overall = next(line for line in table.splitlines() if "all (1-5)" in line)
  assert "86.25 %" in overall and "88.25 %" in overall and "86.51 %" in overall
  assert "ResNet50" in table
  assert "0.7500" in md and "75.00 %" in md and "figures/roc.png" in md


def test_report_vgg_and_unknown_backbones_and_empty_case(tmp_path):
  res = _result(count=(100, 200, 50, 0, 10))
  res = PairEvalResult(
    **{**res.__dict__, "correct_05": np.array([80, 190, 40, 0, 5]), "correct_threshold": np.array([90, 180, 45, 0, 6])}
  )
  table = report.write_report(tmp_path / "vgg", res, val_threshold=None, backbone="vgg16", config_dict=None)
  seen_row = next(line for line in table.splitlines() if "seen (1-2)" in line and "unseen" not in line)
  assert seen_row.rstrip().endswith("| 83.61 % |")  # the source's section 6 for VGG16, cases 1-2
  unseen_row = next(line for line in table.splitlines() if "unseen (4-5)" in line)
  assert unseen_row.rstrip().endswith("| - |")  # the source gives no unseen summary for VGG16
  case4 = next(line for line in table.splitlines() if line.startswith("| 4."))
  assert "| 0 | - | - | 83.00 % |" in case4  # no pairs: no accuracy
  rep = json.loads((tmp_path / "vgg" / "report.json").read_text())
  assert rep["cases"][3]["accuracy_at_0.5"] is None and rep["published"]["seen"] == pytest.approx(0.8361)
  assert rep["published"]["unseen"] is None
  table = report.write_report(tmp_path / "tiny", _result(), val_threshold=0.4, backbone="resnet_tiny", config_dict={})
  # A backbone the source did not use: ResNet50's and VGG16's numbers, labelled, for scale.
  header, _, row1, *_ = table.splitlines()
  assert "| published ResNet50 (for scale) | published VGG16 (for scale) |" in header
  assert row1.rstrip().endswith("| 83.36 % | 83.40 % |")
  seen_row = next(line for line in table.splitlines() if "seen (1-2)" in line and "unseen" not in line)
  assert seen_row.rstrip().endswith("| 87.55 % | 83.61 % |")
  assert "for scale only" in (tmp_path / "tiny" / "report.md").read_text()
  assert json.loads((tmp_path / "tiny" / "report.json").read_text())["published"] is None
  with pytest.raises(ValueError, match="val_threshold"):
    report.write_report(tmp_path, _result(), val_threshold=0.5, backbone="resnet50", config_dict={})


def test_published_numbers_are_the_sources():
  from jsim import published

  pub = published.PUBLISHED
  # Section 6's seen figures are cases 1-2 weighted by their pair counts (180*9,950 and 180*179*50).
  n1, n2 = 180 * 9950, 180 * 179 * 50
  for backbone, seen in (("resnet50", 87.55), ("vgg16", 83.61)):
    cases = pub[backbone]["case_accuracy"]
    assert pub[backbone]["seen_accuracy"] == seen
    assert 0 <= (n1 * cases[1] + n2 * cases[2]) / (n1 + n2) - seen < 0.01  # (87.5556: the source truncates)
  assert pub["resnet50"]["unseen_accuracy"] == 73.8 and pub["vgg16"]["unseen_accuracy"] is None
  assert report.PUBLISHED is pub  # one table


def test_configs_quote_only_published_numbers():
  # Every number in a "Published ..." paragraph (or on a "published" line) of a config's
  # docstring is one of jsim.published's.
  import ast
  import pathlib
  import re

  from jsim import published

  values = published.all_values()
  quoted = 0
  for path in sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    in_table = False
    for line in doc.splitlines():
      in_table = in_table and bool(line.strip())  # a paragraph ends at a blank line
      if line.lstrip().startswith("Published"):
        in_table = True
      if in_table or "ublished" in line:
        for number in re.findall(r"\d+\.\d+", line):
          assert float(number) in values, f"{path.name}: {number} in {line!r} is not in jsim/published.py"
          quoted += 1
  assert quoted >= 18  # configs/protocol.py's table: 6 + 10 cases + 2 seen


def test_figures(tmp_path):
  rows = [
    {
      "epoch": e,
      "lr": 0.01 / 2 ** (e > 4),
      "train_loss": 1.0 / e,
      "train_accuracy": 0.4 + 0.05 * e,
      "val_loss": 1.1 / e,
      "val_accuracy": 0.35 + 0.04 * e,
      "items_per_s": 1000.0,
      "halved": e == 4,
      "extra_key": "x",
    }
    for e in range(1, 8)
  ]
  rows[2]["val_accuracy"] = None
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  drawn_png(figures.plot_stage_curves(metrics, tmp_path / "figures" / "stage1.png", "stage 1, ResNet50"))
  # A halving after the last epoch trains nothing at the new rate: not drawn (a continued stage draws it).
  for halved_last in (False, True):
    rows[-1]["halved"] = halved_last
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures.plot_stage_curves(metrics, tmp_path / f"last_{halved_last}.png", "stage 1, ResNet50")
  assert (tmp_path / "last_True.png").read_bytes() == (tmp_path / "last_False.png").read_bytes()
  # Class names on the retrieval sheet are wrapped, not cut.
  assert figures._two_lines("7: orange stripes crescent") == "7: orange stripes\ncrescent"
  drawn_png(figures.plot_roc(_result(), tmp_path / "figures" / "roc.png"))
  drawn_png(figures.plot_roc({"resnet50": _result(), "vgg16": _result(0.5)}, tmp_path / "figures" / "roc_both.png"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(8, 16, 16, 3), dtype=np.uint8)
  labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
  arr = drawn_png(
    figures.plot_retrieval_sheet(
      images,
      labels,
      [0, 2],
      [[1, 2, 6], [3, 0, 7]],
      tmp_path / "figures" / "retrieval.png",
      class_names=["a", "b", "c"],
      title="unseen queries",
    )
  )
  # Green (right) and red (wrong) borders are both present.
  assert ((arr[..., 1] > 150) & (arr[..., 0] < 60) & (arr[..., 2] < 80)).sum() > 20
  assert ((arr[..., 0] > 190) & (arr[..., 1] < 60) & (arr[..., 2] < 60)).sum() > 20
  with pytest.raises(FileNotFoundError):
    figures.plot_stage_curves(tmp_path / "missing.jsonl", tmp_path / "x.png", "x")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no rows"):
    figures.plot_stage_curves(tmp_path / "empty.jsonl", tmp_path / "x.png", "x")
  with pytest.raises(ValueError, match="uint8"):
    figures.plot_retrieval_sheet(images.astype(np.float32), labels, [0], [[1]], tmp_path / "x.png")


def test_comparison_table(tmp_path):
  rows = [
    {
      "name": "l1",
      "feature": "l1",
      "val_accuracy": 0.9631,
      "test_accuracy": 0.8651,
      "seen_accuracy": 0.875,
      "unseen_accuracy": 0.738,
      "auc": 0.93456,
    },
    {
      "name": "l1+prod",
      "feature": "l1+prod",
      "val_accuracy": 0.97,
      "test_accuracy": None,
      "auc": float("nan"),
      "dropout": 0.5,
    },
  ]
  md = report.write_comparison(rows, tmp_path / "cmp.md", tmp_path / "cmp.json")
  lines = md.splitlines()
  assert lines[0] == ("| run | feature | val accuracy | test accuracy | seen (1-2) | unseen (4-5) | AUC | dropout |")
  assert lines[2] == "| l1 | l1 | 96.31 % | 86.51 % | 87.50 % | 73.80 % | 0.9346 | - |"
  assert lines[3] == "| l1+prod | l1+prod | 97.00 % | - | - | - | - | 0.5 |"
  assert (tmp_path / "cmp.md").read_text() == md
  back = json.loads((tmp_path / "cmp.json").read_text())
  assert back[1]["auc"] is None and back[0]["val_accuracy"] == 0.9631
  with pytest.raises(ValueError):
    report.write_comparison([], tmp_path / "a.md", tmp_path / "a.json")


def test_result_round_trip_and_figure7_from_two_workdirs(tmp_path, capsys, monkeypatch):
  # The source's Figure 7: both backbones' ROC curves, all / seen / unseen, from two evaluated workdirs.
  from jsim.evaluate import compare, pairwise

  res = {"resnet50": _result(0.4), "vgg16": _result(0.6, count=(100, 200, 50, 40, 20))}
  for backbone, r in res.items():
    w = tmp_path / backbone
    write_evaluated_workdir(w, r, backbone=backbone)
    back = pairwise.load_result(w / compare.RESULT_FILE)
    for field in ("count", "correct_05", "correct_threshold", "hist_pos", "hist_neg"):
      np.testing.assert_array_equal(getattr(back, field), getattr(r, field))
    assert (back.threshold, back.mode) == (r.threshold, r.mode)
  out = tmp_path / "fig7.png"
  assert compare.main([str(tmp_path / "resnet50"), str(tmp_path / "vgg16"), f"--out={out}"]) == 0
  assert capsys.readouterr().out == f"wrote {out} (ROC curves of 2 workdirs)\n"  # says what it wrote
  arr = drawn_png(out)
  assert arr.shape[1] > 2 * arr.shape[0]  # three panels side by side
  # Both backbones' colours are drawn (blue and orange lines).
  assert ((arr[..., 2] > 150) & (arr[..., 0] < 80)).sum() > 50
  assert ((arr[..., 0] > 200) & (arr[..., 1] > 100) & (arr[..., 1] < 160) & (arr[..., 2] < 60)).sum() > 50
  label, _ = compare.load_evaluated(tmp_path / "vgg16")
  assert label == "VGG16"
  # evaluation.compare_workdirs: this run's curves first, others labelled apart when they share a backbone.
  seen = {}
  monkeypatch.setattr(figures, "plot_roc_backbones", lambda results, out: seen.update(results) or out)
  compare.roc_of_workdirs(
    [tmp_path / "resnet50", tmp_path / "vgg16"], tmp_path / "x.png", extra={"ResNet50": res["resnet50"]}
  )
  assert list(seen) == ["ResNet50", "ResNet50 (resnet50)", "VGG16"]
  # Refusals: one line each, nothing overwritten, nothing written.
  assert compare.main([str(tmp_path / "resnet50"), f"--out={out}"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("jsim: ") and "exists" in err  # the prefix of every jsim command
  assert compare.main([str(tmp_path), f"--out={tmp_path / 'other.png'}"]) == 1
  err = capsys.readouterr().err
  assert "evaluation.npz is missing" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "other.png").exists()
  # --help says what it draws (any number of workdirs); bad usage is one 'jsim:' line.
  with pytest.raises(SystemExit):
    compare.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "both backbones" not in text and "evaluated workdirs side by side" in text
  with pytest.raises(SystemExit) as exit_:
    compare.main([f"--out={tmp_path / 'y.png'}"])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith("jsim: ") and len(err.splitlines()) == 1


def test_augmentation_figure(tmp_path):
  # The source's Table 1: each augmentation alone, then all four, on a few images.
  from jsim.data import augment
  from jsim.data import augment_figure as figures

  rng = np.random.default_rng(3)
  images = rng.integers(60, 200, size=(3, 32, 32, 3), dtype=np.uint8)
  cfg = augment.default_augment_config()
  cfg.crop_size = 24
  examples, angles = figures.augmentation_examples(images, cfg, seed=1)
  assert examples.shape == (3, len(figures.AUGMENTATION_COLUMNS), 32, 32, 3) and examples.dtype == np.uint8
  np.testing.assert_array_equal(examples[:, 0], images)
  col = {name: examples[:, i] for i, name in enumerate(figures.AUGMENTATION_COLUMNS)}
  np.testing.assert_array_equal(col["flip"], images[:, :, ::-1])  # flip alone is exact
  assert not np.array_equal(col["jitter"], images) and (col["jitter"] > 0).all()  # colour only: no fill
  assert not (col["crop"] == 0).any()  # a crop alone has no fill either
  assert (col["rotation"] == 0).all(-1).any() and (col["all four"] == 0).all(-1).any()  # black fill
  assert np.all(np.abs(angles) <= np.pi / 3)
  arr = drawn_png(figures.plot_augmentations(examples, tmp_path / "aug.png", angles=angles, title="Table 1"))
  assert arr.shape[1] > arr.shape[0]


def test_comparison_table_of_evaluated_workdirs(tmp_path, capsys):
  """compare --table: one row per workdir, its method, five cases and retrieval, read from report.json."""
  from jsim.evaluate import compare

  figures = lambda p1, mapr: {"precision@1": p1, "r_precision": 0.3, "map@r": mapr, "nmi": 0.4, "num_queries": 9}
  retrieval = {"distance": "cosine", "seen": figures(0.5, 0.25), "unseen": figures(0.2, None)}
  for name, loss in (("ce", None), ("ms", "multi_similarity")):
    w, r = tmp_path / name, _result(0.4)
    method = {"stage1_loss": loss, "similarity": "Ms on l1"} if loss else None
    write_evaluated_workdir(
      w, r, backbone="resnet_tiny", method=method, embedding_retrieval=retrieval if loss else None
    )
  table = tmp_path / "cmp.md"
  args = [str(tmp_path / "ce"), str(tmp_path / "ms"), f"--out={tmp_path / 'roc.png'}", f"--table={table}"]
  assert compare.main(args) == 0
  out = capsys.readouterr().out
  assert f"wrote {table} and {table.with_suffix('.json')}:" in out and f"wrote {tmp_path / 'roc.png'}" in out
  lines = table.read_text().splitlines()
  assert lines[0].startswith(
    "| run | backbone | stage 1 loss | pairs scored by | case 1 | case 2 | case 3 | case 4 | case 5 | overall | "
    "seen (1-2) | unseen (4-5) | balanced (4, 5) | AUC | unseen AUC | P@1 seen |"
  )
  # By hand from _result's counts: cases 80/100, 190/200, 40/50, 30/40, 5/10; overall 345/400; (30+5)/(40+10).
  cases = "| 80.00 % | 95.00 % | 80.00 % | 75.00 % | 50.00 % | 86.25 % | 90.00 % | 70.00 % | 62.50 % |"
  assert lines[2].startswith("| ce | resnet_tiny |") and "| cross_entropy | - |" in lines[2] and cases in lines[2]
  assert (
    lines[3].endswith("| 50.00 % | 20.00 % | 25.00 % | - | - | - |") and "| multi_similarity | Ms on l1 |" in lines[3]
  )
  assert json.loads(table.with_suffix(".json").read_text())[1]["unseen_precision@1"] == 0.2
  # A second run refuses to overwrite the table, in one line, and writes nothing.
  capsys.readouterr()
  assert compare.main([*args[:2], f"--out={tmp_path / 'other.png'}", f"--table={table}"]) == 1
  assert "cmp.md exists" in capsys.readouterr().err and not (tmp_path / "other.png").exists()
