"""The method: GRASS's layer-wise sampling and the baselines it is measured against, and the one training step.

``sampler`` (which blocks train: uniform, static, adaptive, cyclic), ``importance`` (per-block gradient RMS, MGN
windows, the one recorder), ``offload`` (AdamW whose state lives on the host), ``loss`` (the loss at supervised
positions only) and ``loss_scale`` (float16), ``methods`` (the builders of the registry's methods) and ``lora``
(peft's LoRA/DoRA), and ``step`` (choose blocks -> forward/backward -> record importance -> optimizer step), which
the native loop, the Trainer callback and the planner's fake runs all drive. It imports ``base``, ``config``,
``model`` and ``parallel``; it knows nothing of data files, runs or front ends.
"""
