"""The Trainer's names as aliases: resolved to one canonical key, written canonically to config.yaml."""

import yaml

from grass_ft.frontends.cli import main
from grass_ft.config import build_config, save_config


def test_trainer_names_resolve_to_canonical_keys(tmp_path):
    cfg = build_config(None, {"learning_rate": "3e-4", "per_device_train_batch_size": "4",
                              "gradient_accumulation_steps": "2", "bf16": "true", "lr_scheduler_type": "cosine",
                              "max_length": "128", "dataset_config": "main"})
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.dtype, cfg.lr_schedule, cfg.max_seq_len, cfg.data_config) \
        == (3e-4, 4, 2, "bfloat16", "cosine", 128, "main")
    save_config(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["lr"] == 3e-4 and "learning_rate" not in written and "bf16" not in written


def test_an_override_alias_wins_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-4\nbatch_size: 8\n")
    cfg = build_config(str(f), {"learning_rate": "2e-4", "fp16": "false"})
    assert cfg.lr == 2e-4 and cfg.batch_size == 8 and cfg.dtype == "float32"


def test_alias_and_canonical_key_together_is_an_error(capsys):
    assert main(["validate", "lr=1e-4", "learning_rate=2e-4", "bf16=maybe"]) == 2
    err = capsys.readouterr().err
    assert "`learning_rate` and `lr` both set `lr`; give one (`lr` is the name config.yaml uses)" in err
    assert "`bf16` must be true or false, got 'maybe'" in err


def test_help_lists_the_aliases(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "[alias: learning_rate]" in out and "[alias: per_device_train_batch_size]" in out


def test_compare_resolves_aliases_per_method():
    from grass_ft.frontends.compare import plan_compare

    plan = plan_compare(None, {"methods": "fft,lora", "lr": "1e-4", "lora.learning_rate": "2e-4",
                               "per_device_train_batch_size": "4", "lora.max_steps": "5"})
    assert plan.configs["fft"].lr == 1e-4 and plan.configs["lora"].lr == 2e-4
    assert plan.configs["fft"].batch_size == plan.configs["lora"].batch_size == 4
    assert any("`lora.max_steps` differs" in w for w in plan.warnings)


def test_lr_unset_takes_the_methods_own_rate_and_config_yaml_records_it(tmp_path):
    from grass_ft.config import TrainConfig
    from grass_ft.base.registry import METHODS, traits

    assert len({t.lr for t in METHODS.values()}) > 1  # the rates differ, so a shared default would mis-tune some
    for method in METHODS:
        assert build_config(None, {"method": method}).lr == traits(method).lr
    assert TrainConfig().method == "auto" and TrainConfig().lr is None  # the planner's method sets it at the start
    assert build_config(None, {"method": "lora", "lr": "5e-5"}).lr == 5e-5  # a rate given always wins
    cfg = build_config(None, {"method": "lora"})
    save_config(cfg, tmp_path / "config.yaml")  # the resolved rate, so a resume or a rerun does not depend on
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == traits("lora").lr  # the registry
    assert build_config(str(tmp_path / "config.yaml"), {"method": "fft"}).lr == traits("lora").lr
