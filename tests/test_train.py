"""Stage 4 training: the fast answer-logits path, batching, schedules, the retriever losses' effect, and real runs
(one process, two torchrun processes, SIGKILL + --resume) on the tiny preset."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_stages
from cozyrag_lib import checkpoint, launch, qa, report, train, train_data, train_eval, train_steps
from cozyrag_lib.paths import RunPaths
from cozyrag_lib.config import load_config
from cozyrag_lib.errors import CozyError
from cozyrag_lib.losses import answer_nll
from cozyrag_lib.retrieval import collate

# a small corpus and few steps keep every run under a minute on 2 cores
STAGE_ARGS = dict(max_articles=80, chunk_max_tokens=64)
RUN_ARGS = ["--max_steps_per_phase=3", "--checkpoint_every=2", "--eval_every=2", "--retriever_candidates=3",
            "--max_train_qa=48", "--max_val_qa=8", "--max_new_tokens=4", "--warmup_steps=2"]
# deterministic CPU runs: one thread per process (the resume test compares weights bit for bit)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------
# fixtures: stage 1-3 artefacts once, copied into a fresh run folder per run


@pytest.fixture(scope="module")
def stages(tmp_path_factory, model_cache):
    return tiny_stages(tmp_path_factory.mktemp("train") / "runs", model_cache, **STAGE_ARGS)


def new_run(stages, name: str) -> Path:
    """A run folder holding copies of the stage 1-3 artefacts."""
    src, dst = stages.run_dir, Path(stages.out_root) / name
    shutil.copytree(src / "qa", dst / "qa")
    shutil.copytree(src / "index", dst / "index")
    shutil.copytree(src / "passages", dst / "passages")
    return dst


def train_cmd(stages, name: str, *extra: str, nproc: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    return [*launcher, "-m", "cozyrag_lib.train", "--preset=tiny", f"--out_root={stages.out_root}", f"--run_name={name}",
            f"--model_cache={stages.model_cache}", *RUN_ARGS, *extra]


def run_training(stages, name: str, *extra: str, nproc: int = 0) -> Path:
    run_dir = new_run(stages, name) if not (Path(stages.out_root) / name).exists() else Path(stages.out_root) / name
    r = subprocess.run(train_cmd(stages, name, *extra, nproc=nproc), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in RunPaths(run_dir).metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(stages) -> Path:
    """One process, batch 4: the reference run of the module."""
    return run_training(stages, "one", "--batch_size=4")


# ----------------------------------------------------------------------------------------------
# logits only at labelled positions == the plain full-logits forward


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.mark.parametrize("arch", ["tiny:gpt2", "llama"])
def test_answer_logits_match_the_full_forward(arch, tiny_generator):
    model = tiny_llama() if arch == "llama" else tiny_generator[0]
    model.eval()  # no dropout: both paths must see the same network
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    examples = [{"prompt_ids": torch.randint(3, V, (n,), generator=g).tolist(),
                 "answer_ids": torch.randint(3, V, (m,), generator=g).tolist() + [2],
                 "question_ids": [5], "words_before": [0] * (m + 1)} for n, m in [(7, 3), (12, 1), (4, 5)]]
    b = collate(examples, pad_id=0, eos_id=2)

    model.zero_grad()
    fast = answer_nll(train_steps.AnswerLM(model)(b["input_ids"], b["attention_mask"], b["positions"]),
                      b["answer_ids"], b["answer_mask"])
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    labels = torch.full_like(b["input_ids"], -100)  # labels only on answer + EOS
    for row, e in enumerate(examples):
        n = len(e["prompt_ids"])
        labels[row, n:n + len(e["answer_ids"])] = torch.tensor(e["answer_ids"])
    model.zero_grad()
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
    ref.backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert len(fast_grads) > 5
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_step_weights_make_micro_batches_add_up_to_the_whole_batch():
    """Each loss part is a mean over its own positions; weighted by step_weights, the micro-batches' parts add up
    to the parts of the whole batch (a plain mean of micro-batch means does not)."""
    from cozyrag_lib.losses import GeneratorLoss

    V, g = 40, torch.Generator().manual_seed(3)
    answers = [[5, 6, 7, 5, 6, 7, 9], [8], [10, 11, 12, 10, 11, 12, 10, 11], [13, 14]]  # repeats, short, long
    examples = [{"prompt_ids": torch.randint(3, V, (4 + i,), generator=g).tolist(), "answer_ids": a + [2],
                 "question_ids": [5, 9 + i], "words_before": list(range(len(a) + 1))} for i, a in enumerate(answers)]
    logits = [torch.randn(len(e["answer_ids"]), V, generator=g) for e in examples]  # each answer position's logits

    def batch_of(rows):
        b = collate([examples[i] for i in rows], pad_id=0, eos_id=2)
        width = b["answer_ids"].shape[1]
        return b, torch.stack([torch.cat([logits[i], torch.zeros(width - len(logits[i]), V)]) for i in rows])

    loss_fn = GeneratorLoss(ngram_repeat_n=2, short_answer_min_words=3, keyword_ignore_ids=[3])
    whole = loss_fn(*batch_of([0, 1, 2, 3])[::-1])[1]
    micro = [batch_of(rows) for rows in ([0, 1], [2, 3])]
    run = types.SimpleNamespace(loss_fn=loss_fn, generator=torch.nn.Linear(1, V))  # get_output_embeddings: V rows
    run.generator.get_output_embeddings = lambda: run.generator
    weights = train_steps.step_weights(run, [b for b, _ in micro])
    summed = [loss_fn(x, b, w)[1] for (b, x), w in zip(micro, weights)]
    plain = [loss_fn(x, b)[1] for b, x in micro]
    for k in whole:
        assert whole[k] > 0, k  # every part applies somewhere
        torch.testing.assert_close(summed[0][k] + summed[1][k], whole[k], msg=k)
    assert abs((plain[0]["lm"] + plain[1]["lm"]) / 2 - whole["lm"]) > 1e-3
    assert train_steps.step_weights(run, [micro[0][0]]) == [dict.fromkeys(whole, 1.0)]  # one batch: unchanged


# ----------------------------------------------------------------------------------------------
# schedule, phases, batches


def test_get_lr_warms_up_then_decays_to_a_tenth():
    lrs = [train_data.get_lr(s, 100, 1.0, 10) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert max(lrs) == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_plan_phases_caps_and_repeats():
    cfg = load_config("tiny", phases=["generator", "retriever"], phase_repeats=2, max_steps_per_phase=0,
                      epochs_per_phase=2.0, batch_size=4, grad_accum=2)
    assert train_data.plan_phases(cfg, 40, world=1) == [("generator", 10), ("retriever", 10)] * 2  # 2 x 10 batches / 2
    cfg.max_steps_per_phase = 3
    assert train_data.plan_phases(cfg, 40, world=2) == [("generator", 3), ("retriever", 3)] * 2
    with pytest.raises(CozyError, match="fewer than one global batch"):
        train_data.plan_phases(cfg, 7, world=2)
    cfg.retriever_max_steps_per_phase = 2  # retriever phases get their own cap; generator phases keep theirs
    assert train_data.plan_phases(cfg, 40, world=2) == [("generator", 3), ("retriever", 2)] * 2


def test_phase_batches_are_the_same_global_batches_for_any_world_size():
    lengths = np.random.default_rng(0).integers(5, 50, 37)
    one = train_data.PhaseBatches(lengths, batch_size=4, world=1, seed=1, phase_index=0)
    two = train_data.PhaseBatches(lengths, batch_size=2, world=2, seed=1, phase_index=0)
    for epoch in range(3):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        assert len(one) == 9 and len(two) == 18  # 37 // 4 global batches of 4; the partial one dropped
        for j in range(9):
            assert one[j] == two[2 * j] + two[2 * j + 1]  # rank 0's slice + rank 1's slice
        flat = [i for j in range(9) for i in one[j]]
        assert len(set(flat)) == 36
    one.set_epoch(0)
    first = [one[j] for j in range(9)]
    one.set_epoch(1)
    assert [one[j] for j in range(9)] != first  # reshuffled each epoch
    # the DistributedSampler hands rank r the items j * world + r
    from torch.utils.data import DistributedSampler

    ranks = [list(DistributedSampler(two, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert ranks == [list(range(0, 18, 2)), list(range(1, 18, 2))]
    # items a phase touches: every item of 9 global batches, then 3 batches into the next epoch
    assert len(one.items_used(9)) == 36 and 36 >= len(one.items_used(3)) == 12
    # grad_accum: the same global batches, cut into micro-batches; rank r's m-th micro-batch of step j is item
    # (j * accum + m) * world + r, so each rank's sampler positions j * accum ... j * accum + accum - 1 make step j
    for bs, world, accum in [(2, 1, 2), (1, 2, 2), (1, 1, 4)]:
        acc = train_data.PhaseBatches(lengths, batch_size=bs, world=world, seed=1, phase_index=0, accum=accum)
        for epoch in range(2):
            one.set_epoch(epoch)
            acc.set_epoch(epoch)
            g = world * accum
            assert len(acc) == 9 * g
            assert all(one[j] == sum((acc[j * g + k] for k in range(g)), []) for j in range(9))
        assert acc.items_used(3) == one.items_used(3)


# ----------------------------------------------------------------------------------------------
# the retriever phase moves scores the right way


PASSAGES = [{"id": "a", "title": "Freedonia", "text": "The capital of Freedonia is Zorbatown, a city on the coast."},
            {"id": "b", "title": "Bananas", "text": "Bananas are yellow fruit that grow in warm countries."}]
QUESTION, ANSWER = "What is the capital of Freedonia?", "Zorbatown"


def fake_run(retriever, generator=None, tokenizer=None, loss="lm_supervised"):
    """The parts of train_state.Run that retriever_loss / candidate_logprobs use, with a real retriever."""
    cfg = load_config("tiny", retriever_loss=loss, context_tokens=64, batch_size=2, retriever_temperature=0.1)
    run = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), retriever=retriever, passage_encoder=retriever,
                                ret_model=train_steps.RetrieverEncoder(retriever), generator=generator, tokenizer=tokenizer,
                                pindex=types.SimpleNamespace(passages=PASSAGES))
    run.autocast = lambda: torch.autocast("cpu", enabled=False)
    return run


def passage_scores(retriever) -> torch.Tensor:
    from cozyrag_lib.embedding import embed_texts

    q = embed_texts(retriever, [QUESTION], show_progress=False)
    p = embed_texts(retriever, [train_steps.passage_text(p) for p in PASSAGES], show_progress=False)
    return torch.from_numpy(p @ q[0])  # (2,) cosine of A and B


def test_lm_supervised_step_raises_the_passage_that_helps_the_generator(retriever, monkeypatch):
    import copy

    st = copy.deepcopy(retriever).eval()  # eval: no dropout, so the score change is the update's alone
    run = fake_run(st)
    run.cfg.retriever_temperature = 1.0  # a soft retriever distribution (~0.65 / 0.35) the target (~0.996) exceeds
    # the generator finds the answer far more likely given A (fixed log-probs stand in for it here)
    monkeypatch.setattr(train_steps, "candidate_logprobs", lambda run, q, a, cand: torch.tensor([[-6.0, -0.5]] * len(q)))
    batch = {"questions": [QUESTION], "answers": [ANSWER], "candidates": [[1, 0]], "gold": [-1]}  # B ranked first
    before = passage_scores(st)
    opt = torch.optim.AdamW(st.parameters(), lr=1e-5)
    for _ in range(2):
        loss, parts = train_steps.retriever_loss(run, batch)
        assert torch.isfinite(loss) and set(parts) >= {"retriever_kl", "gold_passage", "retriever_loss"}
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = passage_scores(st)
    assert (after[0] - after[1]) > (before[0] - before[1]) + 1e-3, (before, after)


def test_generator_log_probs_prefer_the_passage_with_the_answer(retriever, model_cache):
    """The target itself: a real (small, pretrained) generator copies the answer from the passage that holds it."""
    from cozyrag_lib.models import load_generator

    gen, tok = load_generator("embedded:smollm2-135m-instruct", model_cache)
    run = fake_run(retriever, gen, tok)
    lp = train_steps.candidate_logprobs(run, [QUESTION], [ANSWER], torch.tensor([[0, 1, -1]]))
    assert lp.shape == (1, 3) and lp[0, 2] == -1e4  # a missing candidate
    assert lp[0, 0] > lp[0, 1] + 1.0, lp


def test_contrastive_step_runs_on_retrieved_contexts(retriever):
    import copy

    st = copy.deepcopy(retriever)
    run = fake_run(st, loss="contrastive")
    batch = {"questions": [QUESTION, "What colour are bananas?"], "answers": ["x", "y"], "gold": [-1, -1],
             "contexts": [PASSAGES[0]["text"], PASSAGES[1]["text"]]}
    loss, parts = train_steps.retriever_loss(run, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in st.parameters())


# ----------------------------------------------------------------------------------------------
# small pieces


def test_config_toml_round_trips(tmp_path):
    cfg = load_config("tiny", val_questions=["Who wrote 'X, Y'?", 'A "quoted" one\\ ok'], lr_generator=1e-5,
                      qa_extra=["/a b/c.tsv"])
    path = tmp_path / "c.toml"
    path.write_text(launch.config_toml(cfg))
    assert load_config(str(path)) == cfg


def test_qa_extra_adds_only_its_train_split(stages, tmp_path):
    from cozyrag_lib.qa import split_of

    titles = ["Normans", "Geology", "Super_Bowl_50", "Oxygen", "Paris"]  # train, test, validation, ...
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"question": f"About {t}?", "answer": t, "title": t}) + "\n" for t in titles))
    base = len(train_data.load_train_items(load_config("tiny", out_root=stages.out_root, max_train_qa=0)))
    items = train_data.load_train_items(load_config("tiny", out_root=stages.out_root, max_train_qa=0, qa_extra=[str(extra)]))
    added = [it["question"] for it in items[base:]]
    assert added == [f"About {t}?" for t in titles if split_of(t) == "train"] and "About Geology?" not in added
    capped = train_data.load_train_items(load_config("tiny", out_root=stages.out_root, max_train_qa=10))
    assert len(capped) == 10


def test_max_train_descriptions_keeps_every_factoid(stages):
    cfg = load_config("tiny", out_root=stages.out_root, max_train_qa=0)
    every = train_data.load_train_items(cfg)
    n_desc = sum(it["qtype"] == "description" for it in every)
    assert 5 < n_desc < len(every), "the tiny train split should mix descriptions and factoids"
    cfg.max_train_descriptions = 5
    fewer = train_data.load_train_items(cfg)
    assert sum(it["qtype"] == "description" for it in fewer) == 5
    assert [it for it in fewer if it["qtype"] != "description"] == [it for it in every if it["qtype"] != "description"]


def test_description_targets_drop_years_their_context_lacks(stages, tmp_path):
    """With the description line in every built-in context its years are always there: nothing is cut. Without
    it (`embedded_descriptions=false`) a person's years that the bare lead lacks are cut from the target."""
    led = train_data.load_train_items(load_config("tiny", out_root=stages.out_root, max_train_qa=0))
    assert any(re.search(r"\([^()]*\d{4}[^()]*\)$", it["answers"][0]) for it in led if it["qtype"] == "description")
    assert led == train_data.load_train_items(load_config("tiny", out_root=stages.out_root, max_train_qa=0,
                                                          drop_unsupported_years=False))
    cfg = load_config("tiny", out_root=str(tmp_path), max_train_qa=0, drop_unsupported_years=False,
                      embedded_descriptions=False)
    qa.prepare_qa(cfg)
    raw = train_data.load_train_items(cfg)
    cfg.drop_unsupported_years = True
    cut = train_data.load_train_items(cfg)
    changed = [(a, b) for a, b in zip(raw, cut) if a != b]
    assert changed, "the tiny train split should hold a person's description with years its lead lacks"
    for a, b in changed:
        assert a["qtype"] == "description" and a["question"] == b["question"]
        head, years = a["answers"][0].rsplit(" (", 1)
        assert b["answers"][0] == head and any(y not in a["context"] for y in re.findall(r"\d{3,4}", years))
    assert [it for it in cut if it["qtype"] != "description"] == [it for it in raw if it["qtype"] != "description"]


@pytest.mark.parametrize("answer, context, expected", [
    ("French actor (1935–2024)", "Alain Delon was a French actor.", "French actor"),
    ("French actor (1935–2024)", "Alain Delon (born 1935, died 2024) was a French actor.", "French actor (1935–2024)"),
    ("American entertainer (born 1937)", "An American comedian born in 1937.", "American entertainer (born 1937)"),
    ("Taiwanese filmmaker (born 1954)", "A Taiwanese film director.", "Taiwanese filmmaker"),
    ("Dutch colony in Indonesia (1800–1949)", "", "Dutch colony in Indonesia"),
    ("Chemical element with atomic number 17 (Cl)", "", "Chemical element with atomic number 17 (Cl)"),
    ("Germanic Cherusci chieftain (18/17 BC – AD 21)", "", "Germanic Cherusci chieftain (18/17 BC – AD 21)"),
    ("Byzantine emperor from 976 to 1025", "", "Byzantine emperor from 976 to 1025"),  # years in the text stay
    ("(1999)", "", "(1999)"),  # nothing would be left
])
def test_drop_unsupported_years(answer, context, expected):
    assert train_data.drop_unsupported_years(answer, context) == expected


def test_mlflow_is_optional(tmp_path, capsys):
    cfg = load_config("tiny", mlflow=True, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                      out_root=str(tmp_path), run_name="r")
    cfg.paths.train.mkdir(parents=True)
    log = train_eval.MetricsLog(tmp_path / "metrics.jsonl", cfg)
    log.log({"step": 0, "val_recall@5": 0.5})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 0 and row["val_recall@5"] == 0.5 and row["time"] > 0
    try:
        import mlflow  # noqa: F401
    except ImportError:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "mlflow" in err[0].lower()


def test_missing_stage_artefacts_are_a_one_line_error(tmp_path, capsys):
    rc = train.main(["--preset=tiny", f"--out_root={tmp_path}", "--run_name=empty"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "train.jsonl" in err[0], err
    from conftest import run_cli

    r = run_cli("train", "--preset=tiny", f"--out_root={tmp_path}", "--run_name=empty", "--no_such_key=1")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no_such_key" in r.stderr


# ----------------------------------------------------------------------------------------------
# real runs


@pytest.mark.slow
def test_full_cycle_in_one_process(single_run):
    run_dir = single_run
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 0 and "val_loss" in rows[0] and "val_recall@5" in rows[0]  # the step-0 row
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert [r["phase"] for r in steps] == ["generator"] * 3 + ["retriever"] * 3 + ["generator"] * 3
    gen, ret = steps[0], steps[3]
    for k in ("lm", "ngram_repeat", "keyword_overlap", "short_answer", "lr_generator", "tokens_per_s", "samples_per_s"):
        assert k in gen, k
    for k in ("retriever_loss", "retriever_kl", "gold_passage", "lr_retriever", "samples_per_s"):
        assert k in ret, k
    evals = [r for r in rows if "val_loss" in r]
    for k in ("val_loss", "val_recall@5", "val_answer_recall@5", "val_title_recall@5", "val_recall@1", "index_version"):
        assert all(k in r for r in evals), k
    assert [r["step"] for r in evals] == [0, 2, 3, 4, 6, 8, 9]  # every 2 steps and at each phase end
    assert evals[-1]["index_version"] == 1 and evals[0]["index_version"] == 0  # refreshed once
    # the row after the refresh holds the recall an unrefreshed index would have given, and the refresh time
    [after] = [r for r in evals if "refresh_s" in r]
    assert after["step"] == 6 and after["index_version"] == 1 and after["refresh_s"] > 0
    assert 0 <= after["val_recall@1_stale"] <= after["val_recall@5_stale"] <= 1

    # final artefacts load with the plain libraries
    import faiss
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    assert any((run_dir / "final" / "generator").glob("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(run_dir / "final" / "generator")
    st = SentenceTransformer(str(run_dir / "final" / "retriever"), device="cpu")
    index = faiss.read_index(str(run_dir / "final" / "index" / "index.faiss"))
    assert index.ntotal == len(RunPaths(run_dir).passages.read_text().splitlines())
    manifest = json.loads((run_dir / "final" / "index" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["retriever"] == str((run_dir / "final" / "retriever").resolve())
    # the refreshed index holds the trained retriever's passage vectors
    from cozyrag_lib.embedding import passage_texts
    from cozyrag_lib.index import PassageIndex

    pidx = PassageIndex.load(run_dir / "final" / "index", RunPaths(run_dir).passages, retriever=str(run_dir / "final" / "retriever"))
    np.testing.assert_allclose(st.encode(passage_texts(pidx.passages[:3]), normalize_embeddings=True),
                               pidx.embeddings[:3], atol=1e-4)
    assert json.loads((run_dir / "train" / "config.json").read_text())["run_name"] == "one"
    # validation answers after each generator phase; the checkpoint loads without pickled code
    answers = [json.loads(line) for line in RunPaths(run_dir).val_answers.read_text().splitlines()]
    assert [a["step"] for a in answers] == [3, 3, 9, 9] and all(set(a) >= {"question", "answer", "context"} for a in answers)
    state = torch.load(RunPaths(run_dir).checkpoint / "state.pt", weights_only=True)
    assert state["phase_index"] == 3 and state["step"] == 9 and len(state["rng"]) == 1
    # the notebook's helpers
    fig = report.plot_metrics(run_dir)
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000 and len(fig.axes) == 4
    assert "| What is anarchism? |" in report.val_answers_table(run_dir)


@pytest.mark.slow
def test_two_torchrun_processes_follow_the_one_process_curve(stages, single_run):
    run_dir = run_training(stages, "two", "--batch_size=2", nproc=2)  # 2 x 2 = the same global batch of 4
    one = [r for r in read_metrics(single_run) if "loss" in r]
    two = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    # the same questions in every step; only dropout masks and the per-rank averaging differ
    for a, b in zip(one, two):
        tol = 0.02 if a["phase"] == "generator" else 0.25
        assert b["loss"] == pytest.approx(a["loss"], rel=tol), (a, b)
    assert read_metrics(run_dir)[0]["val_loss"] == pytest.approx(read_metrics(single_run)[0]["val_loss"], rel=1e-3)
    state = torch.load(RunPaths(run_dir).checkpoint / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's random state
    gen_sums, ret_sums = zip(*state["weight_checksums"])  # DDP kept both ranks' replicas identical
    assert gen_sums[0] == gen_sums[1] and ret_sums[0] == ret_sums[1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final" / "generator")


@pytest.mark.slow
def test_two_torchrun_processes_train_with_hybrid_retrieval_like_one_process(stages):
    """retrieval=hybrid (BM25 + dense, fused) in every phase: each rank reads index/bm25 and retrieves its
    share; the two-process curve follows the one-process one as with dense retrieval."""
    one = run_training(stages, "one-hybrid", "--batch_size=4", "--retrieval=hybrid")
    two = run_training(stages, "two-hybrid", "--batch_size=2", "--retrieval=hybrid", nproc=2)
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    steps = [(r["phase"], r["step"]) for r in rows_one if "loss" in r]
    assert steps == [(r["phase"], r["step"]) for r in rows_two if "loss" in r] and {p for p, _ in steps} == \
        {"generator", "retriever"}
    for a, b in zip([r for r in rows_one if "loss" in r], [r for r in rows_two if "loss" in r]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02 if a["phase"] == "generator" else 0.25), (a, b)
    evals_one, evals_two = [r for r in rows_one if "val_loss" in r], [r for r in rows_two if "val_loss" in r]
    # step 0: the same base models, so the same hybrid retrieval of the validation questions
    for key in ("val_recall@5", "val_recall@5_bm25", "val_recall@5_dense"):
        assert evals_two[0][key] == evals_one[0][key]
    assert evals_one[0]["val_recall@5"] == evals_one[0]["val_recall@5_hybrid"]


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's checkpoint on disk, -1 while there is none (or it is being swapped in)."""
    try:
        return int(torch.load(RunPaths(run_dir).checkpoint / "state.pt", weights_only=True)["step"])
    except Exception:  # not there yet, or read while it is being replaced
        return -1


def train_until_killed(stages, name: str, at_step: int, *extra: str) -> int:
    """Start training, SIGKILL it as soon as its checkpoint reaches `at_step`; the step of the checkpoint it left."""
    run_dir = Path(stages.out_root) / name
    proc = subprocess.Popen(train_cmd(stages, name, *extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while checkpoint_step(run_dir) < at_step and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return int(torch.load(checkpoint.find_checkpoint(RunPaths(run_dir)) / "state.pt", weights_only=True)["step"])


def assert_same_tree(ref, got, where: str = "") -> None:
    """Two torch.load'ed trees (dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if torch.is_tensor(ref):
        assert torch.is_tensor(got) and ref.dtype == got.dtype and torch.equal(ref, got), where
    elif isinstance(ref, dict):
        assert isinstance(got, dict) and ref.keys() == got.keys(), where
        for k in ref:
            assert_same_tree(ref[k], got[k], f"{where}/{k}")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(ref) == len(got), where
        for i, (a, b) in enumerate(zip(ref, got)):
            assert_same_tree(a, b, f"{where}[{i}]")
    else:
        assert ref == got, (where, ref, got)


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file under folder, keyed by relative file path and tensor name."""
    from safetensors.torch import load_file

    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(stages, single_run):
    """Killed twice (mid generator phase, then mid retriever phase, once the retriever's optimizer has state),
    resumed each time: generator, retriever, both optimizers and the RNG streams end as in the uninterrupted run."""
    name = "killed"
    run_dir = new_run(stages, name)
    first = train_until_killed(stages, name, 2, "--batch_size=4")
    assert 0 < first < 4, first  # a checkpoint of the first generator phase (step 2, or 3 at its end)
    second = train_until_killed(stages, name, 4, "--batch_size=4", "--resume")
    assert 4 <= second < 9, second  # in the retriever phase (steps 4-6) or after it: both optimizers have state
    run_training(stages, name, "--batch_size=4", "--resume")

    for part in ("generator", "retriever"):
        ref, got = safetensors_of(single_run / "final" / part), safetensors_of(run_dir / "final" / part)
        assert ref and ref.keys() == got.keys(), part
        for k in ref:
            assert torch.equal(ref[k], got[k]), (part, k)
    ckpt_ref, ckpt_got = RunPaths(single_run).checkpoint, RunPaths(run_dir).checkpoint
    opts_ref = torch.load(ckpt_ref / "optimizers.pt", weights_only=True)
    opts_got = torch.load(ckpt_got / "optimizers.pt", weights_only=True)
    for part in ("generator", "retriever"):  # every exp_avg / exp_avg_sq tensor and step, and the param groups
        states = opts_ref[part]["state"]
        assert len(states) > 10 and all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in states.values()), part
        assert_same_tree(opts_ref[part], opts_got[part], part)
    state_ref = torch.load(ckpt_ref / "state.pt", weights_only=True)
    state_got = torch.load(ckpt_got / "state.pt", weights_only=True)
    assert state_got["step"] == 9
    # torch's stream (dropout) continues as if never interrupted; Python's and numpy's global streams are saved and
    # restored too, but training draws nothing from them, so they are never seeded and differ between any two runs
    assert_same_tree([r["torch"] for r in state_ref["rng"]], [r["torch"] for r in state_got["rng"]], "rng")
    assert state_ref["weight_checksums"] == state_got["weight_checksums"]

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))  # no step logged twice
    one = {r["step"]: r["loss"] for r in read_metrics(single_run) if "loss" in r}
    assert all(r["loss"] == pytest.approx(one[r["step"]], abs=1e-6) for r in rows if "loss" in r)


def no_dropout_generator(stages, folder: Path) -> Path:
    """A copy of the tiny GPT-2 with dropout off, so two runs that batch differently see the same network."""
    from cozyrag_lib.models import TINY_GENERATOR, resolve_generator_path

    shutil.copytree(resolve_generator_path(TINY_GENERATOR, stages.model_cache), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["resid_pdrop"] > 0  # GPT-2 has dropout: without this copy the comparison would need a tolerance
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_grad_accum_equals_the_same_global_batch(stages, tmp_path):
    """batch 2 x 2 micro-batches = batch 4 in one: the same questions per step, the loss over the whole step's
    answer tokens (not a mean of per-micro-batch means), so the same curve and the same weights."""
    from safetensors.torch import load_file

    gen = no_dropout_generator(stages, tmp_path / "generator")
    args = ["--phases=generator", f"--generator={gen}", "--max_steps_per_phase=4", "--lr_generator=1e-3",
            "--warmup_steps=0", "--eval_every=100", "--checkpoint_every=100", "--val_questions=[]"]
    whole = run_training(stages, "accum1", *args, "--batch_size=4")
    accum = run_training(stages, "accum2", *args, "--batch_size=2", "--grad_accum=2")
    a, b = ([r for r in read_metrics(d) if "loss" in r] for d in (whole, accum))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("loss", "lm", "ngram_repeat", "keyword_overlap", "short_answer"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (k, x, y)
    assert a[-1]["loss"] < a[0]["loss"]  # the steps moved the model (lr 1e-3)
    start = load_file(gen / "model.safetensors")
    wa, wb = (load_file(d / "final" / "generator" / "model.safetensors") for d in (whole, accum))
    moved = sum(float((wa[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    off = sum(float((wb[k] - wa[k]).norm() ** 2) for k in start) ** 0.5
    assert moved > 0.1 and off < 1e-4 * moved, (moved, off)
    val = [[r["val_loss"] for r in read_metrics(d) if "val_loss" in r] for d in (whole, accum)]
    assert val[1] == pytest.approx(val[0], rel=1e-5)


@pytest.mark.slow
def test_compiled_generator_follows_the_eager_curve(stages, tmp_path):
    """compile_generator=true: the generator phase runs through torch.compile (dynamic shapes: one graph for the
    batches' different lengths) and gives the eager run's losses and weights, up to the compiled kernels' rounding."""
    from safetensors.torch import load_file

    gen = no_dropout_generator(stages, tmp_path / "generator")
    args = ["--phases=generator", f"--generator={gen}", "--max_steps_per_phase=4", "--lr_generator=1e-3",
            "--warmup_steps=0", "--eval_every=100", "--checkpoint_every=100", "--val_questions=[]", "--batch_size=4"]
    eager = run_training(stages, "eager", *args)
    run_dir = new_run(stages, "compiled")
    r = subprocess.run(train_cmd(stages, "compiled", *args, "--compile_generator=true"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "generator forward compiled" in r.stdout
    a, b = ([r["loss"] for r in read_metrics(d) if "loss" in r] for d in (eager, run_dir))
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-3)
    wa, wb = (load_file(d / "final" / "generator" / "model.safetensors") for d in (eager, run_dir))
    off = max(float((wb[k] - wa[k]).abs().max()) for k in wa)
    assert off < 1e-3, off


@pytest.mark.slow
def test_eager_attention_follows_the_sdpa_curve(stages, tmp_path):
    """train_attention: auto trains with plain-matmul (eager) attention on a CPU, which the README measures faster
    there than the fused kernel; it gives sdpa's losses and weights up to rounding, and the saved generator
    loads with the library's default attention (the choice is a training setting, not part of the model)."""
    from safetensors.torch import load_file

    gen = no_dropout_generator(stages, tmp_path / "generator")
    args = ["--phases=generator", f"--generator={gen}", "--max_steps_per_phase=4", "--lr_generator=1e-3",
            "--warmup_steps=0", "--eval_every=100", "--checkpoint_every=100", "--val_questions=[]", "--batch_size=4"]
    runs = {}
    for choice in ("sdpa", "auto"):
        runs[choice] = new_run(stages, f"attention_{choice}")
        r = subprocess.run(train_cmd(stages, f"attention_{choice}", *args, f"--train_attention={choice}"), cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert f"generator attention {'sdpa' if choice == 'sdpa' else 'eager'} in its steps, sdpa elsewhere" in r.stdout
    a, b = ([r["loss"] for r in read_metrics(runs[c]) if "loss" in r] for c in ("sdpa", "auto"))
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-4)
    wa, wb = (load_file(runs[c] / "final" / "generator" / "model.safetensors") for c in ("sdpa", "auto"))
    assert max(float((wb[k] - wa[k]).abs().max()) for k in wa) < 1e-4


def test_only_generator_steps_run_the_training_attention(stages, tmp_path):
    """train_attention covers the generator's own steps: the forwards without a backward through it (the
    retriever phase's candidate scores, val_loss, the validation answers) run the attention it was loaded with
    (sdpa), which answers faster on a CPU; training ends under that one, and no saved config keeps eager."""
    from cozyrag_lib.lora import save_generator
    from cozyrag_lib.train_setup import setup_run

    new_run(stages, "attention_phases")
    cfg = load_config("tiny", out_root=stages.out_root, run_name="attention_phases", model_cache=stages.model_cache,
                      **STAGE_ARGS, phases=["generator", "retriever"], max_steps_per_phase=2, batch_size=2,
                      val_questions=["What is anarchism?"], max_new_tokens=2, retriever_candidates=3,
                      train_attention="eager")
    run = setup_run(cfg, torch.device("cpu"), False)
    seen = []  # (gradients on, attention) of every forward through the generator's transformer
    train_steps.base_model_of(run.generator).register_forward_pre_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), run.generator.config._attn_implementation)))
    try:
        train.train_loop(run)
    finally:
        run.log.close()
    assert {a for grad, a in seen if grad} == {"eager"}
    assert {a for grad, a in seen if not grad} == {"sdpa"}
    assert sum(grad for grad, _ in seen) == 2  # the generator phase's two steps
    assert len(seen) > 10  # evaluations, answers and the retriever phase's scores
    assert run.generator.config._attn_implementation == "sdpa"
    # a checkpoint mid generator phase saves the generator under eager: its config.json must not keep that
    run.use_attention(training=True)
    save_generator(run.generator, run.tokenizer, tmp_path, cfg)
    assert "eager" not in (tmp_path / "config.json").read_text()


def test_training_attention_is_eager_on_cpus_and_fused_on_gpus():
    from cozyrag_lib.models import training_attention

    assert training_attention("auto", torch.device("cpu")) == "eager"
    assert training_attention("auto", torch.device("cuda")) == "sdpa"
    assert training_attention("sdpa", torch.device("cpu")) == "sdpa"


@pytest.mark.slow
def test_bf16_training_checkpoints_and_saves_the_fp32_weights(stages):
    """precision=bf16 on two torchrun processes: the loop trains bf16 weights (DDP all-reduces bf16 gradients), a
    checkpoint mid-phase and the final generator hold the fp32 copies (values bf16 cannot hold), training goes on
    after the checkpoint, and the validation loss falls."""
    args = ["--precision=bf16", "--phases=generator", "--max_steps_per_phase=4", "--lr_generator=1e-3",
            "--warmup_steps=0", "--eval_every=4", "--checkpoint_every=2", "--batch_size=2"]
    run_dir = new_run(stages, "bf16")
    r = subprocess.run(train_cmd(stages, "bf16", *args, nproc=2), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "generator weights bf16, AdamW on fp32 copies" in r.stdout  # not the fp32-weights autocast path
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0], val
    paths = RunPaths(run_dir)
    assert json.loads((paths.checkpoint / "config.json").read_text())["bf16_weights"] is True
    for folder in (paths.checkpoint / "generator", paths.final_generator):
        weights = safetensors_of(folder)
        assert all(t.dtype == torch.float32 for t in weights.values()), folder
        w = max(weights.values(), key=torch.numel)
        assert not torch.equal(w, w.to(torch.bfloat16).float()), folder  # the fp32 copies, not bf16 weights


@pytest.mark.slow
def test_chat_template_trains_and_answers(stages, monkeypatch):
    """prompt_template="chat" (the tokenizer's chat template; the tiny generator has SmolLM2's): training runs
    and lowers the validation loss, and the trained run answers through the same template, no markup leaking."""
    from cozyrag_lib import rag as rag_module
    from cozyrag_lib.retrieval import encode_example

    run_dir = run_training(stages, "chat", "--prompt_template=chat", "--phases=generator", "--max_steps_per_phase=4",
                           "--lr_generator=1e-3", "--warmup_steps=0", "--eval_every=100", "--checkpoint_every=100",
                           "--batch_size=4")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in rows if "loss" in r for k in ("loss", "lm", "short_answer"))
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and np.isfinite(val).all() and val[1] < val[0], val
    answers = [json.loads(line) for line in RunPaths(run_dir).val_answers.read_text().splitlines()]
    assert answers and all("<|" not in a["answer"] for a in answers)

    prompts = []
    generate = rag_module.generate_answers

    def recording(model, tok, batch_prompts, *args, **kw):
        prompts.append((list(batch_prompts), kw.get("add_special_tokens")))
        return generate(model, tok, batch_prompts, *args, **kw)

    monkeypatch.setattr(rag_module, "generate_answers", recording)
    rag = rag_module.RAG.load(run_dir, max_new_tokens=16)
    assert rag.cfg.prompt_template == "chat"
    out = rag.answer("Who was Abraham Lincoln?")
    assert isinstance(out["answer"], str) and not any(t in out["answer"] for t in ("<|", "im_start", "im_end"))
    [(sent, special)] = prompts
    assert sent[0].startswith("<|im_start|>") and sent[0].endswith("<|im_start|>assistant\n") and special is False
    assert "Question: Who was Abraham Lincoln?" in sent[0] and out["context"] in sent[0]
    # training saw the same layout: the chat prompt, then the answer and EOS (<|im_end|>, which ends a chat turn)
    ex = encode_example(rag.tokenizer, "Who?", "Ann wrote it.", "Ann", "chat")
    assert rag.tokenizer.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert ex["answer_ids"][-1] == rag.tokenizer.eos_token_id == rag.tokenizer.convert_tokens_to_ids("<|im_end|>")
