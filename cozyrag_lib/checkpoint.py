"""Checkpoints (everything `--resume` needs, under train/checkpoints/last/) and the final models.

    train/checkpoints/last/
        generator/, retriever/   the models being trained (plain HF / sentence-transformers folders; with
                                 lora_r > 0 generator/ holds the LoRA adapter alone, see `lora.py`)
        optimizers.pt            both AdamW states
        state.pt                 TrainState + every rank's RNG states + world size + weight checksums
        embeddings.npy           the refreshed index's vectors (only once a refresh happened)
        phase_data.json          the current phase's retrieval results (so a resumed phase sees the same)
        config.json              the config the run was started with
    final/{generator,retriever,index}/   the trained models and the refreshed index (`rag.RAG.load`); with LoRA
                                         final/generator/ is the adapter, or with lora_merge the merged model

A checkpoint folder is written under a temporary name and swapped in (`atomic_dir`): a crash leaves
the previous one.
"""
from __future__ import annotations

import json
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .atomic import atomic_dir
from .errors import CozyError, first_line
from .index import save_index
from .lora import save_generator
from .master import full_precision
from .models import retriever_identity
from .paths import RunPaths
from .retrieval import SentenceVectors
from .train_data import sentence_cache
from .train_state import Run, TrainState


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain types (loadable with torch.load(weights_only=True))."""
    py = random.getstate()
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    key, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def weight_checksums(run: Run) -> list[float]:
    """[generator, retriever] sums of all weights: equal on every rank when DDP keeps the replicas in step."""
    return [float(sum(p.detach().double().sum() for p in m.parameters())) for m in (run.generator, run.retriever)]


def save_checkpoint(run: Run) -> None:
    """Models, optimizers, position, RNG states (every rank's), versions, phase data, config: one folder, atomically."""
    rngs = distributed.all_gather_object(rng_state())
    checksums = distributed.all_gather_object(weight_checksums(run))
    if distributed.is_main_process():
        st = {**run.state.to_dict(), "metrics_lines": run.log.lines, "rng": rngs, "world_size": distributed.get_world_size(),
              "weight_checksums": checksums}
        with atomic_dir(run.cfg.paths.checkpoint) as tmp:
            with full_precision(run.master):  # bf16 weights: save the fp32 copies, so a resume continues exactly
                save_generator(run.generator, run.tokenizer, tmp / "generator", run.cfg)
            run.retriever.save(str(tmp / "retriever"))
            torch.save({"generator": run.opt_generator.state_dict(), "retriever": run.opt_retriever.state_dict()},
                       tmp / "optimizers.pt")
            torch.save(st, tmp / "state.pt")
            if run.state.index_version != run.state.initial_index_version:  # refreshed: keep its vectors
                np.save(tmp / "embeddings.npy", np.asarray(run.pindex.embeddings, dtype=np.float32))
            (tmp / "phase_data.json").write_text(json.dumps(run.phase_data), encoding="utf-8")
            run.cfg.save(tmp / "config.json")
    distributed.barrier()


def read_checkpoint_file(path: Path, **kw) -> Any:
    """One file of a checkpoint (JSON, or torch.load with weights only); a missing or damaged one is a CozyError."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return torch.load(path, weights_only=True, **kw)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut short, edited, not ours
        reason = first_line(e).split(". ")[0]
        raise CozyError(f"{path}: damaged checkpoint ({reason}); restore it, or delete {path.parent} "
                        "to train from the start") from None


def find_checkpoint(paths: RunPaths) -> Path | None:
    """train/checkpoints/last, or the copy atomic_dir keeps for an instant while swapping a new one in."""
    for p in (paths.checkpoint, paths.checkpoints / ".last.old"):
        if (p / "state.pt").is_file():
            return p
    return None


def save_final(run: Run) -> dict:
    """final/{generator,retriever,index} (index refreshed, manifest version) and train/config.json (rank 0).

    The stage-3 index in run_dir/index/ stays as it was: it belongs to the base retriever (zero-shot runs use it).
    """
    cfg, paths = run.cfg, run.cfg.paths
    # the stored vectors stay only while they belong to the passage encoder (not after a retriever phase that
    # no context was built after, e.g. without validation questions)
    sentences = sentence_cache(run).stored if cfg.sentence_vectors else None
    if cfg.sentence_vectors and sentences is None:  # the index's vectors are stale: embed anew (every rank)
        with run.autocast():
            sentences = SentenceVectors.embed(run.passage_encoder, run.pindex.passages, cfg.embed_batch_size)
    if distributed.is_main_process():
        with atomic_dir(paths.final_generator) as tmp, full_precision(run.master):
            save_generator(run.generator, run.tokenizer, tmp, cfg, merge=cfg.lora_merge)
        with atomic_dir(paths.final_retriever) as tmp:
            run.retriever.save(str(tmp))
        manifest = {**run.pindex.manifest, "version": run.state.index_version,
                    "retriever": retriever_identity(str(paths.final_retriever)),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if cfg.query_only:
            manifest["passage_encoder"] = run.pindex.manifest.get("passage_encoder", run.pindex.manifest["retriever"])
        run.pindex.manifest = manifest
        save_index(paths.final_index, run.pindex.index, np.asarray(run.pindex.embeddings, dtype=np.float32), manifest,
                   cfg, sentences=sentences)
        cfg.save(paths.config(paths.train))
    distributed.barrier()
    return {"generator": str(paths.final_generator), "retriever": str(paths.final_retriever),
            "index": str(paths.final_index), "index_version": run.state.index_version, "steps": run.state.step}


def read_state(ckpt: Path) -> tuple[TrainState, dict]:
    """(TrainState, the whole state.pt dict) of a checkpoint."""
    saved = read_checkpoint_file(ckpt / "state.pt")
    return TrainState.from_dict(saved), saved


def restore(run: Run, ckpt: Path, saved: dict) -> None:
    """Put the checkpoint's optimizer states, phase data and this rank's RNG streams into a freshly set-up run.

    `saved` is the checkpoint's state.pt (its TrainState is already `run.state`); models, the index and
    the refreshed embeddings were loaded from `ckpt` by `train_setup.setup_run`.
    """
    opts = read_checkpoint_file(ckpt / "optimizers.pt", map_location=run.device)
    run.opt_generator.load_state_dict(opts["generator"])
    run.opt_retriever.load_state_dict(opts["retriever"])
    data = read_checkpoint_file(ckpt / "phase_data.json")
    run.phase_data = data if data and data.get("phase_index") == run.state.phase_index else None
    rngs, world = saved["rng"], distributed.get_world_size()
    if len(rngs) == world:
        set_rng_state(rngs[distributed.get_rank()])
    elif distributed.is_main_process():
        print(f"note: checkpoint from {len(rngs)} processes, resuming on {world}: random streams restart",
              file=sys.stderr)

