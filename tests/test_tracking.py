"""MLflow for real: a tiny training run logs its config, every metric row and its final files to a local
SQLite store, read back here with MLflow's own client; a resumed run continues the same MLflow run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from cozyrag_lib import CozyError, load_config
from cozyrag_lib.train_eval import mlflow_key, start_mlflow

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install mlflow)")


@pytest.fixture(scope="module")
def tracked_run(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "runs" / "ml"
    for stage in ("qa", "passages", "index"):
        shutil.copytree(tiny_run.run_dir / stage, run_dir / stage)
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "cozyrag_lib.train", "--preset=tiny", f"--out_root={root / 'runs'}", "--run_name=ml",
           f"--model_cache={tiny_run.model_cache}", "--mlflow=true", f"--mlflow_uri={uri}", "--max_steps_per_phase=2",
           "--eval_every=100", "--retriever_candidates=3", "--max_train_qa=16", "--max_val_qa=8", "--max_new_tokens=4",
           "--warmup_steps=1", "--batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir, uri


def test_params_metrics_and_artefacts_read_back(tracked_run):
    run_dir, uri = tracked_run
    client = mlflow.MlflowClient(tracking_uri=uri)
    [exp] = [e for e in client.search_experiments() if e.name == "cozyrag"]
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    assert (run_dir / "train" / "mlflow_run_id").read_text().strip() == run.info.run_id
    assert float(run.data.params["lr_generator"]) == load_config("tiny").lr_generator
    assert run.data.params["run_name"] == "ml" and run.data.params["mlflow"] == "True"
    # every metric row of train/metrics.jsonl, at its step, with its value
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss", "val_recall@5"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, mlflow_key(key))]
        got, want = sorted(got), sorted(want)
        assert len(want) >= 2 and [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want]), key
    # the final files, beside the SQLite file
    names = {a.path for folder in ("train", "index") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"train/metrics.jsonl", "train/val_answers.jsonl", "train/config.json", "index/manifest.json"} <= names
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="train/metrics.jsonl",
                                                tracking_uri=uri)
    assert open(local).read() == (run_dir / "train" / "metrics.jsonl").read_text()
    store = Path(uri[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((store / "artifacts").resolve().as_uri())


def test_a_resumed_run_continues_its_mlflow_run(tracked_run):
    run_dir, uri = tracked_run
    cfg = load_config("tiny", out_root=str(run_dir.parent), run_name="ml", mlflow=True, mlflow_uri=uri)
    saved = (run_dir / "train" / "mlflow_run_id").read_text().strip()
    ml = start_mlflow(cfg, resume=True)
    try:
        assert ml.active_run().info.run_id == saved
    finally:
        ml.end_run()
    assert len(mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("cozyrag").experiment_id])) == 1


def test_a_store_mlflow_refuses_is_one_line(tmp_path):
    cfg = load_config("tiny", out_root=str(tmp_path), run_name="r", mlflow=True, mlflow_uri=str(tmp_path / "mlruns"))
    cfg.paths.train.mkdir(parents=True)
    with pytest.raises(CozyError, match=r"^mlflow_uri=.*mlruns: ") as e:
        start_mlflow(cfg, resume=False)
    assert "\n" not in str(e.value)
