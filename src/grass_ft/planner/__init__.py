"""Memory planning: what fits the device (and the host) before a single weight loads.

``grass-ft plan`` and ``method=auto`` / ``gamma=auto`` read this package. It predicts, for every setting a user
would consider (fft, fft with checkpointing, fft with its optimizer on the host, the layer-wise methods at each γ
with and without the embeddings/head trained and with the host-lean layout, LISA as shipped, LoRA/DoRA at ranks
8-128), the peak device memory by category, the host memory, and the step's compute relative to fft; then the
most capable setting that fits (docs/PLAN.md).

How: the model's parameter counts come from the model built on the ``meta`` device from its config.json (no
weights); the activations of one decoder block and of the loss come from one forward/backward of that block
under FakeTensorMode with the real shapes (no memory, well under a second); weights, gradients, optimizer state
and masters follow exactly from the counts and the optimizer grass-ft builds; the peak is the largest of the
phases of a step (:mod:`.memory`). tests/test_planner.py holds it within 5% of the FakeTensor estimator's full
runs (benchmarks/plan_grid.py). It imports the method layer (config, registry, models, loss, offload) and nothing
imports it but the front ends (cli, train, hf).
"""

from .memory import Prediction, Setting, predict
from .shape import ModelShape, load_model_config, model_shape
from .sizes import Budgets, detect_budgets, format_size, parse_size

__all__ = ["Budgets", "ModelShape", "Prediction", "Setting", "detect_budgets", "format_size", "load_model_config",
           "model_shape", "parse_size", "predict"]
