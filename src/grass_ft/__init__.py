"""grass-ft: GRASS layer-wise importance sampling for memory-efficient full-parameter fine-tuning.

The public Python API is the names of ``__all__``; the command line is :mod:`grass_ft.cli`. The code lives in
subpackages, one floor of the house each (docs/DESIGN.md has the map): ``base`` (errors, atomic writes, the method
table, the answer rules), ``config``, ``model``, ``data``, ``parallel``, ``method``, ``evaluation``, ``planner``,
``run`` and ``frontends``; a package imports only the floors below its own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["LayerwiseOffloadAdamW", "GrassCallback", "GrassTrainer", "GrassTrainerMixin", "grass_trainer",
           "TrainConfig", "__version__"]

# Where each public name lives; imported on first use, so `import grass_ft` stays light.
_PUBLIC = {"LayerwiseOffloadAdamW": "method.offload", "GrassCallback": "frontends.hf", "GrassTrainer": "frontends.hf",
           "GrassTrainerMixin": "frontends.hf", "grass_trainer": "frontends.hf", "TrainConfig": "config"}

# The flat module paths of the first releases (grass_ft.loss, grass_ft.offload, ...), which docs, notebooks and
# scripts import: each old path is the module (or package) that holds its code now -- the same module object, so
# a monkeypatch through the old path reaches the code that runs.
MOVED: dict[str, str] = {
    "atomic": "base.atomic", "errors": "base.errors", "registry": "base.registry", "tasks": "base.tasks",
    "models": "model", "export": "model.export",
    "formats": "data", "packing": "data.packing",
    "distributed": "parallel.distributed", "fsdp": "parallel.fsdp",
    "sampler": "method.sampler", "importance": "method.importance", "offload": "method.offload", "loss": "method.loss",
    "loss_scale": "method.loss_scale", "lora": "method.lora", "methods": "method.methods", "step": "method.step",
    "scoring": "evaluation.scoring", "evaluate": "evaluation.evaluate", "evalsets": "evaluation.evalsets",
    "train": "run.train", "checkpoint": "run.checkpoint", "preflight": "run.preflight", "recipe": "run.resolve",
    "early_stopping": "run.early_stopping", "modelcard": "run.modelcard", "report": "run.report",
    "logging_sinks": "run.logging_sinks", "divergence": "run.divergence",
    "compare": "frontends.compare", "hf": "frontends.hf", "axolotl_plugin": "frontends.axolotl_plugin",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'grass_ft' has no attribute {name!r}")


class _MovedPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``grass_ft.<old>`` as the module :data:`MOVED` names (an alias in ``sys.modules``, not a copy)."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != __name__ or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system sets the alias's spec on it next
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__spec__.name)  # it ran under its own name already


if not any(isinstance(f, _MovedPaths) for f in sys.meta_path):
    sys.meta_path.append(_MovedPaths())
