"""Stage 4: fine-tune the generator and the retriever in alternating phases.

One script, run either way (DDP is detected from the environment):
    python -m cozyrag_lib.train --preset=tiny [--key=value ...] [--resume]          # one process, CPU or one GPU
    torchrun --nproc_per_node=4 -m cozyrag_lib.train --preset=hpc [--resume]        # one process per GPU
    srun torchrun --nnodes=$SLURM_NNODES ... -m cozyrag_lib.train --preset=hpc     # see sbatch/cozyrag.sbatch

Phases (`cfg.phases * cfg.phase_repeats`):
  * generator - retrieve top_k passages for the phase's training questions, keep their best sentences as
    contexts (`build_contexts`), train the causal LM on prompt -> answer + EOS with `GeneratorLoss`
    (answer NLL + n-gram repeat, keyword overlap and short-answer penalties), LM-head logits computed only
    at answer positions;
  * retriever - `lm_supervised` (default): the retriever's softmax over its top `retriever_candidates`
    passages is pulled toward how likely each passage makes the generator say the gold answer (KL), plus
    InfoNCE toward the gold passage when the item knows it; `contrastive`: in-batch InfoNCE on
    (question, the context it retrieved). Afterwards the corpus is re-embedded and the FAISS index
    rebuilt (`refresh_index`; not with `query_only`, which freezes the passage side). `refresh=retrieved`
    re-embeds only the top `refresh_top_n` passages of the run's questions (and their gold passages),
    `refresh=none` skips it.

The training room, one job a file:
    train.py         the loop and the command line (this file)
    train_setup.py   data, models, index, DDP wrappers and optimizers: the Run the loop trains
    train_state.py   Run (models, optimizers, data, caches) and TrainState (the position a checkpoint saves)
    train_data.py    training QA, phase plan, length-bucketed batches, LR schedule, a phase's retrieval
    train_steps.py   model wrappers and the losses of one step
    train_eval.py    validation metrics, answers to val_questions, index refresh, the metrics log
    checkpoint.py    checkpoints/last and final/
    launch.py        torchrun from a notebook

Artefacts under cfg.run_dir (`paths.RunPaths`):
    train/metrics.jsonl      one JSON object per optimizer step and per evaluation (rank 0 appends, flushes)
    train/val_answers.jsonl  answers to cfg.val_questions after each generator phase
    train/checkpoints/last/  everything `--resume` needs, written atomically
    train/config.json        the resolved config
    final/{generator,retriever,index}/   the trained models and the refreshed index (plain HF / ST / FAISS)
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .checkpoint import save_checkpoint, save_final
from .cli import debug_requested, parse_command
from .config import Config
from .errors import run_guarded
from .jsonio import append_jsonl
from .train_data import PhaseBatches, get_lr, item_lengths, micro_batches, prepare_phase
from .train_eval import answer_val_questions, log_eval, reduce_mean, refresh_index, stale_recall
from .train_setup import setup_run
from .train_state import Run
from .train_steps import generator_loss, get_batch, optimizer_step, retriever_loss, step_weights

# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, resume: bool = False) -> dict:
    """Run every phase of cfg (continuing from train/checkpoints/last with resume); returns where the artefacts are."""
    with distributed.process_group(cfg.device) as device:
        run = setup_run(cfg, device, resume)
        try:
            summary = train_loop(run)
            run.log.log_artifacts(cfg.paths, models=cfg.mlflow_log_models)  # with mlflow=true: to MLflow
            return summary
        finally:
            run.log.close()


def train_loop(run: Run) -> dict:
    cfg, st, world = run.cfg, run.state, distributed.get_world_size()
    main = distributed.is_main_process()
    totals = {k: sum(n for kind, n in run.plan if kind == k) for k in ("generator", "retriever")}
    if main:
        print(f"training {len(run.items)} QA pairs on {world} process(es) ({run.device}); phases: "
              + ", ".join(f"{k} x{n} steps" for k, n in run.plan)
              + f"; generator attention {run.train_attention} in its steps, {run.answer_attention} elsewhere"
              + ("; generator weights bf16, AdamW on fp32 copies" if run.master else "")
              + ("; generator forward compiled (torch.compile)" if hasattr(run.gen_model, "_orig_mod") else ""),
              flush=True)
    if st.step == 0 and st.phase_step == 0 and st.phase_index == 0:
        log_eval(run)  # the step-0 row: where training starts from

    for pi in range(st.phase_index, len(run.plan)):
        kind, n_steps = run.plan[pi]
        st.phase_index = pi
        gen = kind == "generator"
        model = run.gen_model if gen else run.ret_model
        opt, lr0 = (run.opt_generator, cfg.lr_generator) if gen else (run.opt_retriever, cfg.lr_retriever)
        run.generator.train(gen)
        run.retriever.train(not gen)
        phase_batches = PhaseBatches(item_lengths(run.items), cfg.batch_size, world, cfg.seed, pi, cfg.grad_accum)
        sampler = DistributedSampler(phase_batches, num_replicas=world, rank=distributed.get_rank(), shuffle=False)
        if run.phase_data is None:  # retrieve for the questions this phase will use
            run.phase_data = prepare_phase(run, kind, phase_batches.items_used(n_steps))
        stream = micro_batches(phase_batches, sampler, st.epoch, st.pos)
        bar = tqdm(total=n_steps, initial=st.phase_step, desc=f"phase {pi + 1}/{len(run.plan)} {kind}",
                   unit="step", disable=not main, dynamic_ncols=True)
        while st.phase_step < n_steps:
            t0 = time.time()
            run.use_attention(gen)  # again after each evaluation, which answers under answer_attention
            lr = get_lr(st.kind_steps(kind), totals[kind], lr0, cfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            sums, n_tokens, n_samples = {}, 0, 0
            micro = [next(stream) for _ in range(cfg.grad_accum)]  # (epoch, position, item rows) of each micro-batch
            epoch, pos = micro[-1][:2]
            batches = [get_batch(run, kind, rows) for _, _, rows in micro]
            # generator: each loss part weighted by its share of the step's answer positions, so the step is the
            # global batch's mean (not a mean of micro-batch means); retriever: micro-batches of equal size, so the
            # mean of their per-question means (in-batch negatives stay those of each micro-batch)
            weights = step_weights(run, batches) if gen else [None] * cfg.grad_accum
            for m, (batch, w) in enumerate(zip(batches, weights)):
                last = m == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or not distributed.is_distributed() else model.no_sync()
                with sync:
                    if gen:
                        loss, parts = generator_loss(run, batch, w)
                    else:
                        loss, parts = retriever_loss(run, batch)
                        loss, parts = loss / cfg.grad_accum, {k: v / cfg.grad_accum for k, v in parts.items()}
                    loss.backward()
                for k, v in parts.items():  # tensors: summed where they are, read once a step (reduce_mean)
                    sums[k] = sums.get(k, 0.0) + v
                n_tokens += batch["n_tokens"] if gen else 0
                n_samples += len(micro[m][2])
            optimizer_step(opt, cfg.grad_clip, run.master if gen else None)
            st.count_step(kind, epoch, pos)

            dt = time.time() - t0
            rates = {"samples_per_s": n_samples / dt, **({"tokens_per_s": n_tokens / dt} if gen else {})}
            row = reduce_mean({**sums, **rates})
            for k in rates:  # per-rank rates, summed over ranks
                row[k] *= world
            run.log.log({"step": st.step, "phase": kind, "phase_index": pi, **row,
                         ("lr_generator" if gen else "lr_retriever"): lr})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", sps=f"{row['samples_per_s']:.1f}")
            if st.phase_step < n_steps:  # the phase end evaluates and saves anyway
                if st.step % cfg.eval_every == 0:
                    log_eval(run)
                if st.step % cfg.checkpoint_every == 0:
                    save_checkpoint(run)
        bar.close()

        # phase end: refresh the index after a retriever phase, evaluate, answer, checkpoint
        staleness = {}
        if not gen and not cfg.query_only:
            staleness = stale_recall(run)  # before the refresh: the recall an unrefreshed index would give
            staleness.update(refresh_index(run))  # refresh (cfg.refresh), refresh_s, refresh_passages
        log_eval(run, staleness)
        if gen:
            rows = answer_val_questions(run)
            if main and rows:
                append_jsonl(cfg.paths.val_answers, rows)
                st.answers_lines += len(rows)
        st.next_phase()
        run.phase_data = None
        save_checkpoint(run)
    return save_final(run)


# ----------------------------------------------------------------------------------------------
# command line


def cli(argv: list[str]) -> int:
    """`python -m cozyrag_lib.train [--preset=NAME] [--key=value ...] [--resume]`, in the grammar of every
    command (`cozyrag_lib/cli.py`; `--help` lists the options)."""
    parsed = parse_command("train", argv)
    summary = train(parsed.config(), resume=parsed.options["resume"])
    if distributed.is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: cli(argv), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
