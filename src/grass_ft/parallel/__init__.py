"""Several processes: the process group and the bucketed all-reduce of only the parameters that train this step
(``distributed``), and FSDP2 sharding with each decoder block its own unit (``fsdp``).

Layer sampling breaks DDP's assumption that every parameter has a gradient at every step, so grass-ft does its own
data-parallel reduction; both modules are used by the training step (:mod:`grass_ft.method.step`), checkpoints and
the Trainer mixin. It imports ``base`` and ``model`` only (docs/DISTRIBUTED.md).
"""
