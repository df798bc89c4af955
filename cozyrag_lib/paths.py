"""Where a run keeps its artefacts: one place for the folder and file names every stage shares.

    {out_root}/{run_name}/
        qa/{train,validation,test}.jsonl, qa/summary.json, qa/config.json     stage 1 (prepare-qa)
        passages.jsonl, passages.summary.json, passages.config.json           stage 2 (chunk)
        index/                                                                 stage 3 (index)
        checkpoints/last/, metrics.jsonl, val_answers.jsonl, train.config.json stage 4 (train)
        final/{generator,retriever,index}                                      the trained models (rag.RAG.load)
        eval/, plots/                                                          notebook 05, evaluate
"""
from __future__ import annotations

FINAL = "final"  # trained generator/, retriever/ and refreshed index/ under the run folder
