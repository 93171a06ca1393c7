"""The front ends: the ways in from outside, each a thin layer over the same recipe and step.

``cli`` (``grass-ft train | eval | validate | plan | compare | plot | prepare-model``), ``compare`` (several methods
on the same data, each ``grass-ft train`` in its own process), ``hf`` (:class:`GrassCallback` and
:class:`GrassTrainer` for ``transformers.Trainer`` / TRL on the same step pieces) and ``axolotl_plugin`` (the
callback through axolotl's plugin interface). The top floor: it may import everything, and nothing imports it
(but ``grass_ft.cli``, the console script's door, and the lazy names of ``grass_ft``).
"""
