"""Outputs other tools open: every checkpoint-N/ and final/ loads with AutoModelForCausalLM / AutoTokenizer."""

import pytest
import torch
from safetensors.torch import load_file

from grass_ft.config import build_config
from grass_ft.method.methods import method_names
from grass_ft.run.train import run_train


def _run(tmp_path, model_dir, data, **kw):
    out = tmp_path / "run"
    keys = {"model": str(model_dir), "data": str(data), "output_dir": str(out), "max_steps": "5", "batch_size": "2",
            "gamma": "2", "probe_steps": "1", "sample_interval": "2", "save_steps": "2", "save_total_limit": "0",
            "eval_samples": "0", **kw}
    run_train(build_config(None, keys, known_methods=method_names()), progress=False)
    return out


@pytest.mark.parametrize("method", ["grass", "lora"])
def test_checkpoints_and_final_open_with_from_pretrained(tmp_path, tiny_model_dir, tiny_data, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = _run(tmp_path, tiny_model_dir, tiny_data, method=method)
    dirs = [out / "checkpoint-2", out / "checkpoint-4", out / "final"]
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d)  # a lora directory: transformers applies the adapter
        tok = AutoTokenizer.from_pretrained(d)
        assert tok("1+2=")["input_ids"] == ref_tok("1+2=")["input_ids"] and tok.eos_token == ref_tok.eos_token
        assert GenerationConfig.from_pretrained(d).eos_token_id == 0
        if method == "grass" and d.name != "final":
            # the weights from_pretrained built are exactly the checkpoint's (bit-exact: a copy, no arithmetic)
            saved = load_file(d / "model.safetensors")
            state = model.state_dict()
            assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
        if method == "lora":
            assert hasattr(model, "peft_config")  # the adapter was found and applied
    # the trained weights moved between checkpoints, so the test above compared different tensors each time
    a, b = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_report_to_tensorboard_writes_readable_event_files(tmp_path, tiny_model_dir, tiny_data):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(tmp_path, tiny_model_dir, tiny_data, report_to="tensorboard", method="grass", max_steps="8",
               probe_steps="2", probe_mode="measure", sample_interval="3", update_interval="4", save_steps="0")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # every numeric metrics.jsonl field, at every logged step, with the same value (float32 in the event file)
    for field in ("loss", "lr", "tokens_per_s", "optimizer_state_device_bytes", "optimizer_state_host_bytes"):
        events = acc.Scalars(f"train/{field}")
        assert [e.step for e in events] == [m["step"] for m in metrics]
        # TensorBoard stores float32: one rounding of the float64 figure, <= u = 6e-8 relative
        assert [e.value for e in events] == pytest.approx([m[field] for m in metrics], rel=1e-6)
    # grad_norm is None in probe steps, so it starts after the probe
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [m["step"] for m in metrics if not m["probe"]]
    active = acc.Scalars("grass/active_blocks")
    assert [e.step for e in active] == list(range(2, 8)) and {e.value for e in active} == {2.0}
    assert "grass/active_block_ids" in acc.Tags()["histograms"]
    layers = [json.loads(ln) for ln in (out / "layers.jsonl").read_text().splitlines()]
    mgn_steps = [e["step"] for e in layers if e["event"] in ("probe", "refresh")]
    assert {f"grass/mgn/block_{i:02d}" for i in range(4)} <= tags
    got = acc.Scalars("grass/mgn/block_01")
    assert [e.step for e in got] == mgn_steps
    want = [e["mgn"][1] for e in layers if e["event"] in ("probe", "refresh")]
    assert [e.value for e in got] == pytest.approx(want, rel=1e-6)  # float32 storage: <= u = 6e-8 relative


def test_report_to_is_validated(capsys):
    from grass_ft.frontends.cli import main

    assert main(["validate", "report_to=tensorbored"]) == 2
    assert "`report_to` must be one or more (comma-separated) of none, tensorboard, wandb" in capsys.readouterr().err


def test_grass_callback_adds_grass_metrics_to_trainer_logs_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_hf import TOK, Features, collator, training_args
    from tiny import tiny_llama
    from transformers import Trainer
    from transformers.integrations import TensorBoardCallback

    from grass_ft.frontends.hf import GrassCallback

    grass = GrassCallback(method="grass", gamma=2, probe_steps=2, sample_interval=2, update_interval=3,
                          probe_mode="measure")  # the paper's probe: two steps that train nothing
    trainer = Trainer(model=tiny_llama(len(TOK), layers=4), args=training_args(tmp_path, max_steps=6),
                      train_dataset=Features(), data_collator=collator,
                      callbacks=[grass, TensorBoardCallback()])  # the reporter after GrassCallback
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 7))
    assert [h["grass/active_blocks"] for h in logged] == [0, 0, 2, 2, 2, 2]  # two probe steps, then gamma
    assert "grass/mgn/block_00" not in logged[0] and logged[2]["grass/mgn/block_03"] > 0
    assert all(h["grass/optimizer_state_device_bytes"] + h["grass/optimizer_state_host_bytes"] >= 0 for h in logged)
    assert logged[-1]["grass/optimizer_state_host_bytes"] > 0  # blocks that left the active set keep state on host
    runs = list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else [tmp_path]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    # TensorBoardCallback names Trainer logs "train/<key>"
    got = acc.Scalars("train/grass/active_blocks")
    assert [e.step for e in got] == list(range(1, 7)) and [e.value for e in got] == [0, 0, 2, 2, 2, 2]
