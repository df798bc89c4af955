"""Training set-up: data, models (fresh or from a checkpoint), the passage index, DDP wrappers, optimizers.

`setup_run` builds the `Run` that `train.train_loop` trains; `make_run` builds one from parts already
loaded (`bench train` uses it for a generator phase alone).
"""
from __future__ import annotations

import copy
import sys

import numpy as np
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from . import distributed
from .checkpoint import find_checkpoint, read_checkpoint_file, read_state, restore
from .config import Config
from .errors import CozyError
from .embedding import embedding_dim
from .index import PassageIndex, make_faiss_index
from .jsonio import truncate_jsonl
from .losses import GeneratorLoss, stopword_token_ids
from .lora import with_lora
from .master import MasterWeights
from .models import is_adapter_folder, is_peft, load_generator, load_retriever, training_attention, use_bf16
from .qa import read_qa, seeded_sample
from .retrieval import SentenceCache, gold_passages
from .train_data import load_train_items, plan_phases
from .train_eval import MetricsLog
from .train_state import Run, TrainState
from .train_steps import AnswerLM, RetrieverEncoder


def adamw(params, lr: float, weight_decay: float, device: torch.device, fused: bool = True):
    """AdamW over the trainable ones of `params` (with LoRA: the adapters alone); fused: one kernel updates
    every parameter (CPU and CUDA) instead of several ops per tensor."""
    fused = fused and device.type in ("cpu", "cuda")
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def trains_bf16_weights(cfg: Config, device: torch.device) -> bool:
    """Whether the generator trains bf16 weights with fp32 master copies: bf16_weights, where precision is bf16."""
    return cfg.bf16_weights and use_bf16(cfg.precision, device)


def resume_from(cfg: Config, resume: bool):
    """The checkpoint to resume from (None: start afresh), with a note when its config differs."""
    ckpt = find_checkpoint(cfg.paths) if resume else None
    if resume and ckpt is None and distributed.is_main_process():
        print(f"note: --resume but no checkpoint in {cfg.paths.checkpoint}; starting from the beginning", file=sys.stderr)
    if ckpt is not None:
        saved = read_checkpoint_file(ckpt / "config.json")
        changed = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v and k not in ("debug", "device"))
        if changed and distributed.is_main_process():
            print(f"note: resuming with config values that differ from the checkpoint's: {', '.join(changed)}",
                  file=sys.stderr)
    return ckpt


def load_models(cfg: Config, device: torch.device, ckpt):
    """(generator, tokenizer, retriever, passage encoder), from the checkpoint when resuming.

    A LoRA checkpoint holds the adapter alone: it is loaded, trainable, on top of a fresh load of cfg.generator.
    A generator spec that is itself an adapter folder (a LoRA run's final/generator) trains merged into its base.
    """
    if ckpt and is_adapter_folder(ckpt / "generator") != bool(cfg.lora_r):
        saved = read_checkpoint_file(ckpt / "config.json").get("lora_r", 0)
        raise CozyError(f"{ckpt}: a checkpoint of a run with lora_r={saved}; resume with --lora_r={saved}, "
                        f"or delete {ckpt} to train from the start")
    generator, tokenizer = load_generator(str(ckpt / "generator") if ckpt else cfg.generator, cfg.model_cache,
                                          cfg.trust_remote_code, base=cfg.generator if ckpt else None, trainable=True)
    if is_peft(generator) and not ckpt:  # peft froze the base: every merged weight trains again (or gets LoRA)
        generator = generator.merge_and_unload().requires_grad_(True)
    generator.to(device)
    retriever = load_retriever(str(ckpt / "retriever") if ckpt else cfg.retriever, str(device), cfg.trust_remote_code)
    passage_encoder = retriever
    if cfg.query_only:  # a frozen copy of the initial retriever embeds passages (and sentences)
        passage_encoder = load_retriever(cfg.retriever, str(device), cfg.trust_remote_code) if ckpt else copy.deepcopy(retriever)
        passage_encoder.eval().requires_grad_(False)
    return generator, tokenizer, retriever, passage_encoder


def load_passage_index(cfg: Config, retriever, ckpt) -> PassageIndex:
    """The stage-3 index, or the refreshed one a resumed run had reached; every rank reads the stage-3 BM25 index
    (when `retrieval` needs it at once, else on first use: validation reports all three modes when it exists)."""
    paths = cfg.paths
    pindex = PassageIndex.load(paths.index, paths.passages, retriever=None if ckpt else cfg.retriever,
                               expected_dim=embedding_dim(retriever)).configure(cfg, paths.bm25)
    if ckpt and (ckpt / "embeddings.npy").is_file():
        pindex.embeddings = np.load(ckpt / "embeddings.npy")
        pindex.index = make_faiss_index(pindex.embeddings, cfg.index_factory, cfg.nprobe, cfg.ef_search)
    if pindex.embeddings is None:
        raise CozyError(f"{paths.index}: embeddings.npy missing; rebuild the index (python -m cozyrag_lib index)")
    return pindex


def wrap_ddp(generator, retriever, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """AnswerLM(generator), RetrieverEncoder(retriever): DDP-wrapped when distributed."""
    gen_model, ret_model = AnswerLM(generator), RetrieverEncoder(retriever)
    if distributed.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        gen_model = nn.parallel.DistributedDataParallel(gen_model, device_ids=ids)
        # the BERT pooler runs but feeds no loss: unused parameters must be tolerated
        ret_model = nn.parallel.DistributedDataParallel(ret_model, device_ids=ids, find_unused_parameters=True)
    return gen_model, ret_model


def make_run(cfg: Config, device: torch.device, generator, tokenizer, retriever, pindex: PassageIndex,
             items: list[dict], plan: list[tuple[str, int]], state: TrainState, val_items: list[dict] = (),
             passage_encoder=None, fused_adamw: bool = True) -> Run:
    """A Run from loaded parts: DDP wrappers, AdamW for both models, the generator loss, gold passages, caches.

    `setup_run` (training) and `bench train` (a generator phase alone) both build their run here.
    """
    answer_attention, train_attention = generator.config._attn_implementation, training_attention(cfg.train_attention, device)
    generator.set_attn_implementation(train_attention)  # train_loop switches between the two (Run.use_attention)
    generator = with_lora(generator, cfg)  # lora_r > 0: adapters on a frozen generator (kept when resumed)
    # bf16 weights before DDP sees them (its buckets take their dtype); AdamW then steps the fp32 copies
    master = MasterWeights(generator) if trains_bf16_weights(cfg, device) else None
    gen_model, ret_model = wrap_ddp(generator, retriever, device)
    if cfg.compile_generator:  # compiled on the first step; one graph for every batch shape (dynamic)
        gen_model = torch.compile(gen_model, dynamic=True)
    passage_encoder = passage_encoder or retriever
    run = Run(cfg=cfg, device=device, generator=generator, tokenizer=tokenizer, retriever=retriever,
              passage_encoder=passage_encoder, gen_model=gen_model, ret_model=ret_model,
              opt_generator=adamw(master.params if master else generator.parameters(), cfg.lr_generator,
                                  cfg.weight_decay, device, fused_adamw),
              opt_retriever=adamw(retriever.parameters(), cfg.lr_retriever, cfg.weight_decay, device, fused_adamw),
              loss_fn=GeneratorLoss.from_config(cfg, keyword_ignore_ids=stopword_token_ids(tokenizer)),
              pindex=pindex, items=items, gold=gold_passages(items, pindex.passages), val_items=list(val_items),
              plan=plan, state=state, master=master, train_attention=train_attention,
              answer_attention=answer_attention)
    # the index's stored sentence vectors belong to the passage encoder before any retriever phase (and to the
    # frozen one of query_only): phase 1 reads its context sentences from there instead of encoding them
    fresh = state.ret_step == 0 or cfg.query_only
    run.sentence_cache = SentenceCache(passage_encoder, cfg.embed_batch_size, version=state.ret_step,
                                       stored=pindex.sentence_store() if fresh and cfg.sentence_vectors else None)
    return run


def setup_run(cfg: Config, device: torch.device, resume: bool) -> Run:
    """Load data, models (from the checkpoint when resuming), index and optimizers; wrap models in DDP."""
    hf_logging.disable_progress_bar()  # our own bars show progress; "Loading weights" bars would bury them
    paths, world = cfg.paths, distributed.get_world_size()
    paths.upgrade()
    ckpt = resume_from(cfg, resume)
    items = load_train_items(cfg)
    plan = plan_phases(cfg, len(items), world)  # a batch larger than the data fails now, not after loading the models
    val_items = seeded_sample(read_qa(paths.qa_split("validation")), cfg.max_val_qa, cfg.seed)  # every source represented
    torch.manual_seed(cfg.seed)  # identical initial weights wherever something is initialised at random

    generator, tokenizer, retriever, passage_encoder = load_models(cfg, device, ckpt)
    pindex = load_passage_index(cfg, retriever, ckpt)
    state, saved = read_state(ckpt) if ckpt else (TrainState.starting_at(int(pindex.manifest.get("version", 0))), None)
    run = make_run(cfg, device, generator, tokenizer, retriever, pindex, items, plan, state, val_items, passage_encoder)
    if ckpt:
        restore(run, ckpt, saved)
    else:
        torch.manual_seed(cfg.seed + distributed.get_rank())  # dropout differs between ranks, as it should
    if distributed.is_main_process():
        paths.train.mkdir(parents=True, exist_ok=True)
        cfg.save(paths.config(paths.train))
        truncate_jsonl(paths.val_answers, state.answers_lines if ckpt else None)
    run.log = MetricsLog(paths.metrics, cfg, state.metrics_lines if ckpt else None)
    return run
