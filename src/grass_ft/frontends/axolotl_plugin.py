"""GRASS in axolotl through axolotl's own plugin interface (``plugins:`` in its YAML), the way ``lisa_n_layers``
turns on LISA there: a few ``grass_*`` keys, ``grass_gamma`` among them, turn on
:class:`grass_ft.frontends.hf.GrassCallback`.

```yaml
plugins:
  - grass_ft.frontends.axolotl_plugin.GrassPlugin
grass_gamma: 4                 # blocks trained at a time: turns GRASS on
grass_method: grass-uniform    # or grass, grass-static, lisa, badam
grass_sample_interval: 25
```

Install with ``pip install "grass-ft[axolotl]"``. axolotl pins its own transformers, TRL and peft releases; where
those differ from the ones grass-ft runs with, the plugin was tested against axolotl's ``BasePlugin`` as its docs
define it, not inside an axolotl run (docs/AXOLOTL.md says which). Every key is validated by
:func:`grass_ft.frontends.hf.callback_config` when axolotl registers the plugin, so a bad value fails before any
weight loads, all errors at once.
"""

from __future__ import annotations

import os
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from .hf import METHOD_KEYS, GrassCallback, callback_config

PREFIX = "grass_"
# the callback keys an axolotl YAML may set, as grass_<key> (the planner's memory keys are GrassCallback's too)
KEYS = tuple(k for k in METHOD_KEYS if k not in ("max_seq_len",))


class GrassArgs(BaseModel):
    """The ``grass_*`` keys of an axolotl config (axolotl merges this model into its config schema). Meanings and
    defaults: ``grass-ft train --help`` (``grass_method`` defaults to ``grass-uniform``, the callback's)."""

    grass_gamma: int | str | None = None
    grass_method: str | None = None
    grass_tau: float | None = None
    grass_alpha: float | None = None
    grass_probe_steps: int | None = None
    grass_probe_mode: str | None = None
    grass_importance: str | None = None
    grass_sample_interval: int | None = None
    grass_update_interval: int | None = None
    grass_train_embeddings: bool | None = None
    grass_train_head: bool | None = None
    grass_reset_state_on_switch: bool | None = None
    grass_layers_attribute: str | None = None
    grass_seed: int | None = None
    grass_device_memory: str | None = None
    grass_host_memory: str | None = None
    grass_memory_margin: float | None = None


def _get(cfg: Any, key: str) -> Any:
    """A key of axolotl's config (its ``DictDefault``, a dict with attribute access) or of a plain dict."""
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def grass_keys(cfg: Any) -> dict[str, Any]:
    """The GrassCallback keys set in ``cfg`` (``grass_gamma`` -> ``gamma``, ...); empty when GRASS is off."""
    keys = {k: _get(cfg, PREFIX + k) for k in KEYS}
    keys = {k: v for k, v in keys.items() if v is not None}
    if keys.get("gamma") == "auto" and _get(cfg, "sequence_len"):
        keys["max_seq_len"] = int(_get(cfg, "sequence_len"))  # gamma=auto prices axolotl's sequence length
    return keys if "gamma" in keys else {}


class GrassPlugin(BasePlugin):
    """axolotl plugin: ``grass_gamma`` (and the other ``grass_*`` keys) turn on GRASS layer sampling.

    - ``register``: validates every ``grass_*`` key at once, and refuses ``lisa_n_layers`` beside ``grass_gamma``
      (two layer samplers would fight over ``requires_grad``);
    - ``get_input_args``: :class:`GrassArgs`, merged into axolotl's config schema;
    - ``add_callbacks_pre_trainer``: the :class:`~grass_ft.frontends.hf.GrassCallback`, passed to the Trainer at
      construction (so it checks ``gamma`` against the model there);
    - ``get_trainer_cls``: under several processes, axolotl's trainer with
      :class:`~grass_ft.frontends.hf.GrassTrainerMixin` (no DDP wrapper; the active blocks' gradients all-reduced).
    """

    def register(self, cfg: dict) -> None:
        keys = grass_keys(cfg)
        if not keys:
            return
        if _get(cfg, "lisa_n_layers"):
            from ..config import ConfigError

            raise ConfigError(["`grass_gamma` and `lisa_n_layers` both set: each samples layers; keep one "
                               "(grass_method: lisa is LISA through grass-ft)"])
        callback_config(keys)  # every bad grass_* value at once, before axolotl loads the model

    def get_input_args(self) -> str:
        return f"{__name__}.GrassArgs"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        keys = grass_keys(cfg)
        return [GrassCallback(**keys)] if keys else []

    def get_trainer_cls(self, cfg: Any):
        if not grass_keys(cfg) or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None  # one process: axolotl's own trainer, the callback is all it takes
        from axolotl.core.trainers.base import AxolotlTrainer

        from .hf import grass_trainer

        return grass_trainer(AxolotlTrainer)
