"""The names of what a workdir W holds (the layout the package docstring draws)."""

STAGE1, EMBEDDINGS, STAGE2 = "stage1", "embeddings", "stage2"
RESULT_FILE = "result.json"
LOCK_FILE = ".jsim.lock"
OVERWRITE_FILE = "overwrite.json"
REPORT_FILE = "report.json"
# What the evaluation writes into W (jsim.evaluate.evaluation): computed from both stages.
EVALUATION_OUTPUTS = (REPORT_FILE, "report.md", "evaluation.npz", "figures", "evaluation")
PREDICT_CACHES = ("onnx", "predict_cache")  # jsim.export.DEFAULT_DIR, jsim.predict.CACHE_DIR
