"""Where a run keeps its artefacts: the one place that names the folders and files every stage shares.

    {out_root}/{run_name}/
        qa/           train.jsonl validation.jsonl test.jsonl   config.json summary.json   stage 1 (prepare-qa)
        passages/     passages.jsonl                            config.json summary.json   stage 2 (chunk)
        index/        index.faiss embeddings.npy manifest.json  config.json                stage 3 (index)
          bm25/       bm25s' arrays, vocab and params, manifest.json                       (BM25, same stage)
        train/        metrics.jsonl val_answers.jsonl checkpoints/last/  config.json       stage 4 (train)
        final/        generator/ retriever/ index/                                         the trained models
        eval/, plots/                                                                      evaluate, notebook 05

Every stage writes its resolved config as `<artefact>/config.json` and its summary (when it has one)
as `<artefact>/summary.json`. Runs made with the earlier flat layout (`passages.jsonl`,
`train.config.json`, `metrics.jsonl`, ... beside `qa/`) are moved into this one by `RunPaths.upgrade`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FINAL = "final"  # trained generator/, retriever/ and refreshed index/ under the run folder
SPLITS = ("train", "validation", "test")

# earlier flat layout -> this one (relative to the run folder); moved by RunPaths.upgrade
_RENAMED = {
    "passages.jsonl": "passages/passages.jsonl",
    "passages.config.json": "passages/config.json",
    "passages.summary.json": "passages/summary.json",
    "train.config.json": "train/config.json",
    "train.launch.toml": "train/launch.toml",
    "metrics.jsonl": "train/metrics.jsonl",
    "val_answers.jsonl": "train/val_answers.jsonl",
    "checkpoints": "train/checkpoints",
}


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run folder.

    >>> p = RunPaths("outputs/runs/demo")
    >>> p.passages.as_posix(), p.qa_split("test").as_posix(), p.checkpoint.as_posix()
    ('outputs/runs/demo/passages/passages.jsonl', 'outputs/runs/demo/qa/test.jsonl', 'outputs/runs/demo/train/checkpoints/last')
    """

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # stage 1
    @property
    def qa(self) -> Path:
        return self.root / "qa"

    def qa_split(self, split: str) -> Path:
        return self.qa / f"{split}.jsonl"

    # stage 2
    @property
    def passages_dir(self) -> Path:
        return self.root / "passages"

    @property
    def passages(self) -> Path:
        return self.passages_dir / "passages.jsonl"

    # stage 3
    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def bm25(self) -> Path:
        """The BM25 index beside the FAISS one; the trained run's refreshed final/index shares it (same passages)."""
        return self.index / "bm25"

    # stage 4
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def val_answers(self) -> Path:
        return self.train / "val_answers.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "last"

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def final_generator(self) -> Path:
        return self.final / "generator"

    @property
    def final_retriever(self) -> Path:
        return self.final / "retriever"

    @property
    def final_index(self) -> Path:
        return self.final / "index"

    # reading results
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @staticmethod
    def config(artefact: Path) -> Path:
        """The resolved config a stage wrote beside its artefact folder."""
        return artefact / "config.json"

    @staticmethod
    def summary(artefact: Path) -> Path:
        return artefact / "summary.json"

    def stage_configs(self) -> list[Path]:
        """Stage configs, latest stage first (what `rag.run_config` reads a run's settings from)."""
        return [self.config(d) for d in (self.train, self.index, self.passages_dir, self.qa)]

    def upgrade(self) -> list[str]:
        """Move a run of the earlier flat layout into this one (renames only); returns what moved."""
        moved = []
        for old, new in _RENAMED.items():
            src, dst = self.root / old, self.root / new
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(src, dst)
                except FileNotFoundError:  # another rank of the same torchrun job moved it first
                    continue
                moved.append(f"{old} -> {new}")
        return moved
