"""Outputs other tools open: every checkpoint-N/ and final/ loads with AutoModelForCausalLM / AutoTokenizer."""

import pytest
import torch
from safetensors.torch import load_file

from grass_ft.config import build_config
from grass_ft.methods import method_names
from grass_ft.train import run_train


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
