"""What a training run holds: `Run` (models, optimizers, data, index, caches) and `TrainState` (its position).

`TrainState` is what a checkpoint's `state.pt` stores (as a plain dict, so `torch.load(weights_only=True)`
reads it); everything else in `Run` is rebuilt by `train_setup.setup_run` from the config and the checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Config
from .models import autocast
from .retrieval import SentenceCache


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint, restored on resume."""

    phase_index: int = 0  # the phase being trained (index into Run.plan)
    phase_step: int = 0  # optimizer steps taken in that phase
    epoch: int = 0  # epoch and position of the phase's next micro-batch (PhaseBatches / DistributedSampler)
    pos: int = 0
    step: int = 0  # optimizer steps taken in all phases
    gen_step: int = 0  # ... in generator phases (the generator's LR schedule position)
    ret_step: int = 0  # ... in retriever phases (also the retriever's version: retrieval results depend on it)
    index_version: int = 0  # refreshes of the index (manifest `version`)
    initial_index_version: int = 0  # the version the run started from (the stage-3 index, or a resumed one)
    metrics_lines: int = 0  # rows in metrics.jsonl / val_answers.jsonl at the checkpoint (a resume cuts the rest)
    answers_lines: int = 0

    @classmethod
    def starting_at(cls, index_version: int) -> "TrainState":
        return cls(index_version=index_version, initial_index_version=index_version)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """The state of a checkpoint's state.pt (extra keys such as `rng` are the caller's)."""
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def kind_steps(self, kind: str) -> int:
        """Optimizer steps taken so far by the phases of `kind` ("generator" or "retriever")."""
        return self.gen_step if kind == "generator" else self.ret_step

    def count_step(self, kind: str, epoch: int, pos: int) -> None:
        """One optimizer step of a `kind` phase, whose last micro-batch was (epoch, pos)."""
        self.step += 1
        self.phase_step += 1
        self.epoch, self.pos = epoch, pos + 1
        if kind == "generator":
            self.gen_step += 1
        else:
            self.ret_step += 1

    def next_phase(self) -> None:
        self.phase_index += 1
        self.phase_step = self.epoch = self.pos = 0


@dataclass
class Run:
    """Everything one training run holds: config, models, optimizers, data, index, caches, position."""

    cfg: Config
    device: torch.device
    generator: Any  # the causal LM (unwrapped)
    tokenizer: Any
    retriever: Any  # SentenceTransformer being trained (question side, and passage side unless query_only)
    passage_encoder: Any  # = retriever, or a frozen copy of the initial one with query_only
    gen_model: nn.Module  # AnswerLM(generator), DDP-wrapped when distributed
    ret_model: nn.Module | None  # RetrieverEncoder(retriever), DDP-wrapped when distributed
    opt_generator: torch.optim.Optimizer  # over master.params with bf16 weights, else the generator's own
    opt_retriever: torch.optim.Optimizer | None
    loss_fn: nn.Module
    pindex: Any  # PassageIndex (index, passages, manifest, embeddings)
    items: list[dict]  # training QA
    gold: list[int]  # gold passage row per training item (-1 unknown)
    val_items: list[dict]
    plan: list[tuple[str, int]]  # (phase kind, optimizer steps) for every phase
    state: TrainState = field(default_factory=TrainState)
    phase_data: dict | None = None  # contexts / candidates of the current phase's questions
    sentence_cache: SentenceCache | None = None
    context_cache: dict = field(default_factory=dict)  # (retriever v., index v., n sentences, retrieval) -> {id: context}
    val_cache: dict = field(default_factory=dict)  # (retriever version, index version) -> retrieval results
    log: Any = None  # MetricsLog
    master: Any = None  # MasterWeights of the generator (bf16_weights under bf16), else None
    train_attention: str = "sdpa"  # the generator's attention in its own phase's steps (cfg.train_attention resolved)
    answer_attention: str = "sdpa"  # ... everywhere else: the one it was loaded with

    @property
    def versions(self) -> tuple[int, int]:
        """(retriever version, index version): what retrieval results depend on.

        The retriever version is its number of optimizer updates (so an evaluation in the middle of a
        retriever phase retrieves afresh); the index version counts refreshes (manifest `version`).
        """
        return self.state.ret_step, self.state.index_version

    @property
    def phase(self) -> str:
        """The kind of the current phase (the last one once training is done)."""
        return self.plan[min(self.state.phase_index, len(self.plan) - 1)][0]

    def autocast(self):
        return autocast(self.cfg.precision, self.device)

    def use_attention(self, training: bool) -> None:
        """Put the generator under `train_attention` for a generator-phase step (training=True), else under
        `answer_attention`: forwards without a backward through the generator (the retriever phase's candidate
        scores, val_loss, the validation answers) keep the attention that answers fastest."""
        impl = self.train_attention if training else self.answer_attention
        if self.generator.config._attn_implementation != impl:
            self.generator.set_attn_implementation(impl)
