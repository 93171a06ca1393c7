"""The native loop end to end: the output-directory contract, on a tiny model and on the real SmolLM2."""

import json
import subprocess
import sys

import pytest
import yaml

from grass_ft.config import build_config
from grass_ft.method.methods import method_names
from grass_ft.run.train import run_train


def read_jsonl(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_output_contract_on_tiny_model(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = build_config(None, {"model": str(tiny_model_dir), "data": str(tiny_data), "output_dir": str(out),
                              "method": "grass", "max_steps": "14", "batch_size": "2", "gamma": "2", "probe_steps": "3",
                              "probe_mode": "measure", "sample_interval": "4", "update_interval": "5",
                              "eval_samples": "4", "max_new_tokens": "4", "eval_batch_size": "4"},
                       known_methods=method_names())
    summary = run_train(cfg, progress=False)

    assert yaml.safe_load((out / "config.yaml").read_text())["gamma"] == 2
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(14))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "active", "peak_memory_bytes",
                "optimizer_state_device_bytes", "optimizer_state_host_bytes"):
        assert key in metrics[0]
    assert [m["probe"] for m in metrics[:4]] == [True, True, True, False]
    assert all(m["grad_norm"] is None for m in metrics[:3]) and metrics[3]["grad_norm"] > 0

    # The contract's steps: probe line once at the end of the probe, draws every sample_interval from
    # probe_steps, refreshes every update_interval after the probe.
    events = read_jsonl(out / "layers.jsonl")
    assert [(e["step"], e["event"]) for e in events] == [
        (3, "probe"), (3, "draw"), (7, "draw"), (8, "refresh"), (11, "draw"), (13, "refresh")]
    for e in events:
        assert len(e["mgn"]) == 4 and len(e["probs"]) == 4
        assert sum(e["probs"]) == pytest.approx(1.0)  # float64 softmax written as JSON: within ~1e-15 of 1
    draws = [e for e in events if e["event"] == "draw"]
    assert all(len(d["active"]) == 2 for d in draws)
    # the active set reported per step follows the draws
    for m in metrics[3:]:
        current = [d for d in draws if d["step"] <= m["step"]][-1]
        assert m["active"] == current["active"]
    # a refresh changes MGN only for blocks observed in its window
    first_refresh = events[3]
    observed = set(draws[0]["active"]) | set(draws[1]["active"])
    for b in range(4):
        if b not in observed:
            assert first_refresh["mgn"][b] == events[0]["mgn"][b]

    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for key in ("eval_loss", "eval_loss_before", "accuracy", "accuracy_before", "peak_memory_bytes",
                "optimizer_state_bytes", "trainable_params", "tokens_per_s", "mgn_bookkeeping_fraction"):
        assert s[key] is not None, key
    assert s["optimizer_state_device_bytes"] == 0 and s["optimizer_state_host_bytes"] > 0
    # GRASS's probe peak is read when the probe ends, apart from the training steps' (on CPU both are peak RSS,
    # which cannot be reset, so the later reading is never below the earlier)
    assert 0 < s["probe_peak_memory_bytes"] <= s["peak_memory_bytes"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    preds = read_jsonl(out / "predictions.jsonl")
    assert json.loads((out / "eval.json").read_text())["accuracy"] == sum(p["correct"] for p in preds) / len(preds)


def test_grass_static_never_refreshes(tiny_model_dir, tiny_data, tmp_path):
    cfg = build_config(None, {"model": str(tiny_model_dir), "data": str(tiny_data), "output_dir": str(tmp_path),
                              "method": "grass-static", "max_steps": "12", "batch_size": "2", "gamma": "1",
                              "probe_steps": "2", "probe_mode": "measure", "sample_interval": "2",
                              "update_interval": "2", "eval_samples": "0"}, known_methods=method_names())
    run_train(cfg, progress=False)
    events = read_jsonl(tmp_path / "layers.jsonl")
    assert {e["event"] for e in events} == {"probe", "draw"}
    assert len({tuple(e["probs"]) for e in events}) == 1  # probabilities fixed by the probe


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_end_to_end(tmp_path):
    """A few GRASS steps on the packaged SmolLM2-135M-Instruct through the console command."""
    out = tmp_path / "smol"
    r = subprocess.run([sys.executable, "-m", "grass_ft.cli", "train", "--quiet", f"output_dir={out}",
                        "method=grass", "max_steps=4", "probe_steps=1", "probe_mode=measure", "sample_interval=2",
                        "update_interval=2", "gamma=2", "batch_size=2", "train_samples=16", "eval_samples=4",
                        "eval_batch_size=4", "max_new_tokens=12", "max_seq_len=128"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval loss" in r.stdout and "accuracy" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "smollm2-135m" and "4-bit" in s["model_note"]
    assert s["eval_loss"] > 0 and 0 <= s["accuracy"] <= 1
    assert s["optimizer_state_device_bytes"] == 0
    events = read_jsonl(out / "layers.jsonl")
    assert events[0]["event"] == "probe" and len(events[0]["mgn"]) == 30
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.config.num_hidden_layers == 30
