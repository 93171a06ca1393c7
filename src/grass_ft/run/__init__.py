"""The native run, ``grass-ft train``: a recipe of named setup steps, one loop, one finish, and what a run leaves.

``train`` (the recipe: checks, output directory, model, method, resume, loop, finish), ``preflight`` (every check
before the model loads), ``resolve`` (what a run settles at its start: dtype, steps, warm-up, config.yaml's every
key), ``checkpoint`` (atomic checkpoints, name-keyed optimizer state, resume), ``divergence`` (when a run has ruined
its model), ``early_stopping`` (the best evaluation and its weights), ``logging_sinks`` (TensorBoard / W&B),
``modelcard`` and ``report`` (the model card, tables and plots of runs). It may import every floor below it
(``base`` .. ``planner``); only the front ends import it.
"""
