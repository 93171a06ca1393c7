"""The axolotl plugin through axolotl's plugin interface: against axolotl's real BasePlugin where axolotl is
installed, else against a stand-in with the methods axolotl 0.19.0's ``integrations/base.py`` defines (its pins
conflict with the project's transformers/TRL: docs/AXOLOTL.md)."""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "AXOLOTL.md"


class _StandInBasePlugin:
    """axolotl's BasePlugin as its docs define it: every hook a no-op (None, or [] for the callback lists)."""

    def __init__(self):
        pass

    def register(self, cfg): ...
    def get_input_args(self): ...
    def pre_model_load(self, cfg): ...
    def post_model_load(self, cfg, model): ...
    def get_trainer_cls(self, cfg): ...
    def post_trainer_create(self, cfg, trainer): ...
    def create_optimizer(self, cfg, trainer): ...
    def add_callbacks_pre_trainer(self, cfg, model): return []
    def add_callbacks_post_trainer(self, cfg, trainer): return []
    def post_train(self, cfg, model): ...


@pytest.fixture
def plugin_module(monkeypatch):
    """``grass_ft.axolotl_plugin`` over axolotl's BasePlugin, or over the stand-in when axolotl is absent."""
    pytest.importorskip("pydantic")  # axolotl's config schema language; the plugin's GrassArgs is a pydantic model
    try:
        importlib.import_module("axolotl.integrations.base")
    except ImportError:
        for name in ("axolotl", "axolotl.integrations"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        base = types.ModuleType("axolotl.integrations.base")
        base.BasePlugin = _StandInBasePlugin
        monkeypatch.setitem(sys.modules, "axolotl.integrations.base", base)
    monkeypatch.delitem(sys.modules, "grass_ft.axolotl_plugin", raising=False)
    module = importlib.import_module("grass_ft.axolotl_plugin")
    yield module
    sys.modules.pop("grass_ft.axolotl_plugin", None)


def load_plugin(name: str):
    """axolotl's ``load_plugin``: ``module.Class`` -> an instance."""
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)()


def doc_yaml() -> dict:
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    return yaml.safe_load(block)


def test_the_docs_yaml_turns_grass_on_through_the_plugin_interface(plugin_module, tmp_path):
    from axolotl.integrations.base import BasePlugin

    raw = doc_yaml()
    plugins = [load_plugin(name) for name in raw["plugins"]]
    assert isinstance(plugins[0], BasePlugin)
    plugin = plugins[0]
    plugin.register(raw)
    args_model = getattr(importlib.import_module(plugin.get_input_args().rsplit(".", 1)[0]),
                         plugin.get_input_args().rsplit(".", 1)[1])
    cfg = {**raw, **args_model(**{k: v for k, v in raw.items() if k.startswith("grass_")}).model_dump()}
    assert plugin.get_trainer_cls(cfg) is None  # one process: axolotl's own trainer
    from grass_ft.frontends.hf import GrassCallback

    callbacks = plugin.add_callbacks_pre_trainer(cfg, model=None)
    assert len(callbacks) == 1 and isinstance(callbacks[0], GrassCallback)
    assert (callbacks[0].config.method, callbacks[0].config.gamma, callbacks[0].config.sample_interval) == \
        ("grass-uniform", 4, 25)
    # and it trains in a Trainer, as axolotl's (a transformers.Trainer subclass) runs it
    from transformers import Trainer, TrainingArguments

    from grass_ft import data as data_mod
    from tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    feats = [data_mod.tokenize_example(tok, {"instruction": f"{a}+{a}=", "input": "", "output": str(2 * a)}, 256)
             for a in range(8)]
    cb = plugin.add_callbacks_pre_trainer({**cfg, "grass_gamma": 2, "grass_sample_interval": 2}, model=None)[0]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-2)
    trainer = Trainer(model=tiny_llama(len(tok)), args=args, train_dataset=feats, callbacks=[cb],
                      data_collator=lambda f: data_mod.collate(f, tok.pad_token_id))
    trainer.train()
    trace = (tmp_path / "layers.jsonl").read_text()
    assert trace.count('"draw"') == 2  # a draw every 2 steps


def test_no_grass_gamma_means_the_plugin_does_nothing(plugin_module):
    plugin = plugin_module.GrassPlugin()
    plugin.register({"lisa_n_layers": 2})
    assert plugin.add_callbacks_pre_trainer({"lisa_n_layers": 2}, model=None) == []
    assert plugin.get_trainer_cls({}) is None


def test_bad_grass_keys_fail_at_registration_all_at_once(plugin_module):
    from grass_ft.config import ConfigError

    plugin = plugin_module.GrassPlugin()
    with pytest.raises(ConfigError) as e:
        plugin.register({"grass_gamma": 0, "grass_method": "fft", "grass_tau": -1})
    assert len(e.value.errors) == 3 and "`gamma` must be at least 1" in str(e.value)
    with pytest.raises(ConfigError, match="`grass_gamma` and `lisa_n_layers` both set"):
        plugin.register({"grass_gamma": 2, "lisa_n_layers": 2})
