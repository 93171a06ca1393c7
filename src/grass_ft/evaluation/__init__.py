"""Evaluation: a model scored on held-out examples, by greedy generation or log-likelihood under LLM-Adapters'
answer rules, and by held-out loss (overall and per task).

``scoring`` (generation, choice log-likelihoods, the held-out loss), ``evaluate`` (:func:`evaluate`, the one entry
point of every evaluation; ``eval.json`` and ``predictions.jsonl``; model loading and ``run_eval`` for
``grass-ft eval``) and ``evalsets`` (LLM-Adapters folders, BIG-bench files, generators as evaluation sets). It
imports ``base``, ``config``, ``model`` and ``data``, never a run: the native loop calls it through
:mod:`grass_ft.run.held_out`.
"""
