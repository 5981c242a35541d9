"""python -m jsim.sweep (seeds x grid, one workdir per run) and compare's mean +/- std over seeds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, READ_ONLY_XLA_CACHE, drawn_png, jsim_env, write_evaluated_workdir

from jsim import sweep
from jsim.evaluate import compare, pairwise


@pytest.mark.parametrize(
  "item,expect",
  [
    ("classifier.learning_rate", "--grid=classifier.learning_rate: expected KEY=VALUE1,VALUE2"),
    ("=1,2", "--grid==1,2: expected KEY=VALUE1,VALUE2"),
    ("classifier..lr=1", "--grid=classifier..lr=1: expected KEY=VALUE1,VALUE2"),
    ("seed=1,2", "--grid=seed=1,2: give the seeds with --seeds=0,1,2"),
    ("classifier.learning_rate=1e-3,,1e-2", "--grid=classifier.learning_rate=1e-3,,1e-2: an empty value"),
    ("classifier.learning_rate=", "--grid=classifier.learning_rate=: an empty value"),
    ("classifier.learning_rate=0.1,0.1", "--grid=classifier.learning_rate=0.1,0.1: a value is given twice"),
  ],
)
def test_grid_errors_are_one_line_naming_the_item(item, expect):
  with pytest.raises(ValueError) as e:
    sweep.parse_grid([item])
  assert str(e.value).startswith(expect) and "\n" not in str(e.value)


def test_grid_parser_and_run_names():
  grid = sweep.parse_grid(["classifier.learning_rate=1e-4,1e-3", "config.similarity.hidden=(64,32),()"])
  assert grid == [("classifier.learning_rate", ["1e-4", "1e-3"]), ("similarity.hidden", ["(64,32)", "()"])]
  with pytest.raises(ValueError, match="classifier.loss is in the grid twice"):
    sweep.parse_grid(["classifier.loss=triplet", "classifier.loss=contrastive"])
  runs = sweep.plan_runs(grid, [0, 1])
  assert [r.name for r in runs[:3]] == [
    "classifier.learning_rate=1e-4,similarity.hidden=_64_32_,seed=0",
    "classifier.learning_rate=1e-4,similarity.hidden=_64_32_,seed=1",
    "classifier.learning_rate=1e-4,similarity.hidden=__,seed=0",
  ]
  assert len(runs) == 8 and runs[0].overrides() == [
    "--config.seed=0",
    "--config.classifier.learning_rate=1e-4",
    "--config.similarity.hidden=(64,32)",
  ]
  assert sweep.plan_runs([], [3])[0].name == "seed=3"
  with pytest.raises(ValueError, match="share the workdir name 'data.root=_a,seed=0'"):
    sweep.plan_runs(sweep.parse_grid(["data.root=/a,_a"]), [0])
  assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
  for bad in ("0,x", "0,0", "-1", ""):
    with pytest.raises(ValueError, match=f"--seeds={bad}: expected"):
      sweep.parse_seeds(bad)


@pytest.mark.parametrize(
  "args,expect",
  [
    (["--grid=classifier.learnin_rate=1,2"], "config.classifier has no key 'learnin_rate'; did you mean"),
    (["--grid=classifier.num_epochs=two"], "run classifier.num_epochs=two,seed=0:"),
    (
      ["--grid=classifier.loss=nope", "--config.classifier.sampler_m=3"],
      "run classifier.loss=nope,seed=0: classifier.loss='nope'",
    ),
    (["--seeds=0", "--config.seed=3"], "--config.seed=3: seed is set by the sweep (--seeds)"),
    (["--seeds=0,a"], "--seeds=0,a: expected integers"),
  ],
)
def test_bad_sweep_input_is_one_line_and_runs_nothing(tmp_path, capsys, args, expect):
  root = tmp_path / "root"
  assert sweep.main(["--config=configs/tiny.py", f"--workdir={root}", *args]) == 1
  err = capsys.readouterr().err
  assert err.startswith("jsim.sweep: ") and expect in err and err.count("\n") == 1, err
  assert not root.exists()


def _evaluated(w, seed, config, unseen_auc, case_5_correct):
  """A workdir as the evaluation leaves it (test_report's), with config.json and an unseen AUC of our choosing."""
  bins = 4
  count = np.array([100, 200, 50, 40, 10])
  hp, hn = np.zeros((5, bins), np.int64), np.zeros((5, bins), np.int64)
  hp[0, 3], hp[3, 3] = 100, 40
  hn[1, 0], hn[2, 0], hn[4, 0] = 200, 50, 10
  r = pairwise.PairEvalResult(
    count=count,
    correct_05=np.array([80, 190, 40, 30, case_5_correct]),
    correct_threshold=np.array([90, 180, 45, 32, 6]),
    hist_pos=hp,
    hist_neg=hn,
    threshold=0.5,
    mode="sampled",
    pairs_per_s=1.0,
  )
  write_evaluated_workdir(w, r, backbone="resnet_tiny")
  rep = json.loads((w / "report.json").read_text())
  rep["auc"]["unseen"] = unseen_auc
  (w / "report.json").write_text(json.dumps(rep))
  (w / "config.json").write_text(json.dumps({**config, "seed": seed, "stage": "all"}))


def test_compare_groups_seeds_into_mean_and_std(tmp_path, capsys):
  lr1, lr2 = {"classifier": {"learning_rate": 0.1}}, {"classifier": {"learning_rate": 0.2}}
  runs = [
    ("lr=0.1,seed=0", 0, lr1, 0.60, 5),
    ("lr=0.1,seed=1", 1, lr1, 0.70, 7),
    ("lr=0.1,seed=2", 2, lr1, 0.80, 9),
    ("lr=0.2,seed=0", 0, lr2, 0.50, 4),
  ]
  for name, seed, config, auc, c5 in runs:
    _evaluated(tmp_path / name, seed, config, auc, c5)
  workdirs = [tmp_path / r[0] for r in runs]
  groups = compare.seed_groups(workdirs)
  assert groups == [workdirs[:3], workdirs[3:]]
  table = tmp_path / "t.md"
  assert compare.main([*map(str, workdirs), f"--out={tmp_path / 'roc.png'}", f"--table={table}"]) == 0
  rows = json.loads(table.with_suffix(".json").read_text())
  assert [r["name"] for r in rows] == ["lr=0.1", "lr=0.2"] and [r["seeds"] for r in rows] == ["0,1,2", "0"]
  assert rows[0]["unseen_auc"] == pytest.approx(0.7) and rows[0]["unseen_auc_std"] == pytest.approx(0.1)
  assert rows[0]["case_5"] == pytest.approx(0.7) and rows[0]["case_5_std"] == pytest.approx(0.2)
  assert rows[1]["unseen_auc_std"] == 0.0
  md = table.read_text().splitlines()
  assert md[0].startswith("| run | seeds | backbone |")
  assert (
    "| lr=0.1 | 0,1,2 | resnet_tiny |" in md[2] and "| 70.00 ± 20.00 % |" in md[2] and "| 0.7000 ± 0.1000 |" in md[2]
  )
  # The same run twice is refused in one line.
  (tmp_path / "copy").mkdir()
  (tmp_path / "copy" / "config.json").write_text((workdirs[0] / "config.json").read_text())
  with pytest.raises(ValueError, match="are the same run"):
    compare.seed_groups([workdirs[0], tmp_path / "copy"])
  # Without config.json a workdir is its own group; names without a common stem are joined.
  assert compare.group_name([tmp_path / "a_seed1", tmp_path / "a_seed2"]) == "a"
  assert compare.group_name([tmp_path / "x", tmp_path / "y"]) == "x+y"
  # Two sweeps name their runs alike: the rows say which sweep (the parent folder) each is.
  groups = [[tmp_path / "ms" / "lr=1,seed=0", tmp_path / "ms" / "lr=1,seed=1"], [tmp_path / "pa" / "lr=1,seed=0"]]
  assert compare.distinct_names(groups) == ["ms/lr=1", "pa/lr=1"]
  assert compare.distinct_names([[tmp_path / "a"], [tmp_path / "b"]]) == ["a", "b"]  # one folder: names alone
  ce = [tmp_path / "ce" / "seed=0", tmp_path / "ce" / "seed=1"]  # a sweep without a grid: named by its folder
  assert compare.distinct_names([ce, groups[1]]) == ["ce", "pa/lr=1"]


def test_the_figure_draws_every_workdir_under_its_methods_name(tmp_path, monkeypatch, capsys):
  # Two sweeps of one backbone name their runs alike (ms/lr=1,seed=0 and pa/lr=1,seed=0): their curves were
  # once keyed by "backbone (workdir name)", and all but one of each name were silently dropped.
  ms, pa = {"classifier": {"loss": "multi_similarity"}}, {"classifier": {"loss": "proxy_anchor"}}
  workdirs = []
  for sweep_dir, config in (("ms", ms), ("pa", pa)):
    for seed in (0, 1):
      w = tmp_path / sweep_dir / f"lr=1,seed={seed}"
      _evaluated(w, seed, config, 0.6 + 0.1 * seed, 5 + seed)
      workdirs.append(w)
  workdirs.append(tmp_path / "ce" / "seed=0")  # a sweep without a grid
  _evaluated(workdirs[-1], 0, {}, 0.5, 4)
  drawn = {}
  monkeypatch.setattr(compare.figures, "plot_roc_backbones", lambda results, out: drawn.update(results) or out)
  compare.roc_of_workdirs(workdirs, tmp_path / "x.png")
  assert list(drawn) == ["ms/lr=1", "pa/lr=1", "ce"]  # the table's names (one backbone: it names none alone)
  assert [len(drawn[k]) for k in ("ms/lr=1", "pa/lr=1")] == [2, 2]  # a method's seeds: one entry, every curve
  monkeypatch.undo()
  # Each method's seeds were split alike (split.json per seed): not flagged; a method on other splits is.
  for w in workdirs:
    (w / "split.json").write_text(
      json.dumps({"seen_classes": [0, 1], "seed": json.loads((w / "config.json").read_text())["seed"]})
    )
  assert compare.main([*map(str, workdirs[:4]), f"--out={tmp_path / 'a.png'}", f"--table={tmp_path / 'a.md'}"]) == 0
  assert "split differently" not in capsys.readouterr().err
  assert compare.main([*map(str, workdirs[2:]), f"--out={tmp_path / 'b.png'}", f"--table={tmp_path / 'b.md'}"]) == 0
  assert "split differently" in capsys.readouterr().err  # pa on seeds 0 and 1, ce on seed 0 alone
  arr = drawn_png(compare.roc_of_workdirs(workdirs, tmp_path / "roc.png"))
  assert arr.shape[1] > 2 * arr.shape[0] * 0.8  # three panels side by side, the legends below them


def _sweep_command(root, *args) -> list[str]:
  """python -m jsim.sweep over seeds 0 and 1 of configs/tiny.py into root."""
  return [sys.executable, "-m", "jsim.sweep", "--config=configs/tiny.py", f"--workdir={root}", "--seeds=0,1", *args]


def test_tiny_sweep_end_to_end(tmp_path, jsim_cache):
  """Two seeds of configs/tiny.py: two workdirs; the rerun skips both; compare gives mean +/- std."""
  root = tmp_path / "sweep"
  command = _sweep_command(
    root,
    "--grid=classifier.optimizer=adam",  # (and a schedule, a metric loss with a miner: all through jsim.main)
    "--config.classifier.schedule=warmup_cosine",
    "--config.classifier.loss=triplet",
    "--config.classifier.loss_hparams.triplet.miner=triplet_margin",
    "--config.classifier.miner_hparams.triplet_margin.type_of_triplets=semihard",
    "--config.classifier.sampler_m=3",
    "--config.classifier.warmup_epochs=1",
    "--config.classifier.num_epochs=1",
    "--config.similarity.num_epochs=1",
  )
  run = lambda: subprocess.run(command, cwd=REPO, env=jsim_env(jsim_cache), capture_output=True, text=True, timeout=900)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = ["classifier.optimizer=adam,seed=0", "classifier.optimizer=adam,seed=1"]
  for name, seed in zip(names, (0, 1)):
    config = json.loads((root / name / "config.json").read_text())
    assert config["seed"] == seed and config["classifier"]["optimizer"] == "adam"
    assert config["classifier"]["loss_hparams"]["triplet"]["miner"] == "triplet_margin"
    assert config["classifier"]["num_epochs"] == 1 and (root / name / "report.json").is_file()
    (row,) = [json.loads(line) for line in (root / name / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert row["lr"] == pytest.approx(config["classifier"]["learning_rate"] / 2)  # the warm-up's first epoch
  record = json.loads((root / sweep.SWEEP_FILE).read_text())
  assert [(r["name"], r["status"]) for r in record["runs"]] == [(n, "finished") for n in names]
  assert "jsim.sweep: 2 runs finished" in proc.stdout
  # The rerun starts no run.
  again = run()
  assert again.returncode == 0, again.stderr[-3000:]
  assert [line for line in again.stdout.splitlines() if line.startswith("jsim.sweep: [")] == [
    f"jsim.sweep: [{i}/2] {n}: finished, skipped" for i, n in enumerate(names, 1)
  ]
  table = tmp_path / "t.md"
  assert compare.main([str(root / n) for n in names] + [f"--out={tmp_path / 'roc.png'}", f"--table={table}"]) == 0
  (row,) = json.loads(table.with_suffix(".json").read_text())
  assert row["name"] == "classifier.optimizer=adam" and row["seeds"] == "0,1"
  assert row["unseen_auc_std"] >= 0 and "±" in table.read_text()


def test_loss_rate_follows_a_learning_rate_override():
  # The proxies' 10x is a factor of classifier.learning_rate: a sweep over the rate moves both.
  arg = "configs/metric.py:loss=proxy_anchor,size=cpu"
  assert sweep.build_config(arg, []).classifier.loss_learning_rate == pytest.approx(0.5)  # as recorded before
  c = sweep.build_config(arg, ["--config.classifier.learning_rate=0.001"])
  assert c.classifier.loss_learning_rate == pytest.approx(0.01)
  c = sweep.build_config(arg, ["--config.classifier.learning_rate=0.001", "--config.classifier.loss_learning_rate=0.3"])
  assert c.classifier.loss_learning_rate == 0.3 and c.classifier.learning_rate == 0.001
  from jsim import workdir as wd

  assert wd.config_to_dict(c)["classifier"]["loss_learning_rate"] == 0.3


def test_sigterm_stops_the_running_child_with_a_checkpoint_and_the_sweep(tmp_path, jsim_cache):
  """A SIGTERM to the sweep reaches the run (in its own session), which saves and stops; no run starts after."""
  import signal
  import time

  root = tmp_path / "sweep"
  command = _sweep_command(root, "--config.classifier.num_epochs=50")
  proc = subprocess.Popen(
    command,
    cwd=REPO,
    env=jsim_env(jsim_cache, **READ_ONLY_XLA_CACHE),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = root / "seed=0" / "stage1" / "metrics.jsonl"
  deadline = time.monotonic() + 600
  while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "jsim.sweep: stopped by SIGTERM in seed=0; rerun the same command to continue" in err
  assert "SIGTERM at " in err and "rerun the same command to resume" in err  # the run's own message
  record = json.loads((root / sweep.SWEEP_FILE).read_text())
  assert [(r["name"], r["status"]) for r in record["runs"]] == [("seed=0", "interrupted")]
  assert any(p.name.isdigit() for p in (root / "seed=0" / "stage1" / "checkpoints").iterdir())
  assert not (root / "seed=1").exists()


def test_sweeps_that_share_a_root_keep_each_others_runs(tmp_path):
  # Two processes (sweeps over other grids into one ROOT) record 30 runs each at the same time: none is lost.
  code = """
import sys
from pathlib import Path
from jsim import sweep
root, who = Path(sys.argv[1]), sys.argv[2]
for i in range(30):
  sweep.write_record(root, {"config": who, "extra": []}, {"name": f"{who}{i}", "seed": 0, "status": "running"})
  sweep.write_record(root, {"config": who, "extra": []}, {"name": f"{who}{i}", "status": "finished", "wall_s": 1.5})
"""
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), who], cwd=REPO) for who in "ab"]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  runs = json.loads((tmp_path / sweep.SWEEP_FILE).read_text())["runs"]
  assert sorted(r["name"] for r in runs) == sorted(f"{who}{i}" for who in "ab" for i in range(30))
  assert all(r["status"] == "finished" and r["wall_s"] == 1.5 and r["seed"] == 0 for r in runs)
