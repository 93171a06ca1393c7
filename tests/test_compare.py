"""``grass-ft compare`` and ``grass-ft plot``: key splitting and validation, the error column, the table, the
charts, and end-to-end compares on a tiny Llama (one with all six methods, one where a method fails)."""

import json

import pytest

from grass_ft.frontends.cli import main
from grass_ft.frontends.compare import error_message, plan_compare
from grass_ft.config import ConfigError
from grass_ft.run.report import FROZEN, PROBE, TRAINED, activity_matrix, results_markdown
from grass_ft.base.registry import traits

SIX = ["fft", "lora", "dora", "lisa", "grass", "grass-static"]


def tiny_keys(model, data, out, **extra):
    kv = {"model": model, "data": data, "output_dir": out, "max_steps": 4, "batch_size": 2, "eval_samples": 4,
          "max_new_tokens": 4, "eval_batch_size": 4, "gamma": 2, "probe_steps": 1, "sample_interval": 1,
          "update_interval": 2, "lora_r": 4, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def overrides(*args):
    return dict(a.split("=", 1) for a in args)


# ---------------------------------------------------------------------------------------------- planning


def test_per_method_keys_apply_to_their_method_only(tmp_path, tiny_model_dir, tiny_data):
    plan = plan_compare(None, overrides(*tiny_keys(tiny_model_dir, tiny_data, tmp_path / "cmp"),
                                        "methods=fft,lora,grass", "lora.lr=2e-4", "grass.gamma=3"))
    assert plan.methods == ["fft", "lora", "grass"]
    assert plan.configs["lora"].lr == 2e-4 and plan.configs["fft"].lr == traits("fft").lr != traits("grass").lr \
        == plan.configs["grass"].lr  # lr unset: each method's own rate
    assert plan.configs["grass"].gamma == 3 and plan.configs["fft"].gamma == 2
    argv = plan.argv("lora")
    assert argv[1:4] == ["-m", "grass_ft.cli", "train"]
    assert "method=lora" in argv and f"output_dir={tmp_path / 'cmp' / 'lora'}" in argv and "lr=2e-4" in argv
    assert plan.warnings == []


def test_default_methods_are_the_six_and_the_default_method(tmp_path, tiny_data):
    assert plan_compare(None, {"data": str(tiny_data), "output_dir": str(tmp_path)}).methods == [*SIX,
                                                                                                   "grass-uniform"]


def test_every_error_reported_at_once_shared_ones_once(tmp_path, tiny_model_dir, tiny_data):
    with pytest.raises(ConfigError) as e:
        plan_compare(None, overrides(*tiny_keys(tiny_model_dir, tiny_data, tmp_path), "methods=fft,lora,bogus",
                                     "foo=1", "tau=0", "lora.lr=abc", "dora.lr=1e-4", "sgd.lr=1", "method=fft",
                                     "lora.output_dir=x", "fft.lora_dropout=2"))
    errors = e.value.errors
    text = str(e.value)
    assert ("`methods` must be a comma-separated list of grass, grass-static, lisa, fft, lora, dora, grass-uniform, "
            "badam, got 'fft,lora,bogus'") in text
    assert sum("unknown key `foo`" in m for m in errors) == 1  # shared by every method: listed once
    assert sum("`tau` must be > 0" in m for m in errors) == 1
    assert "lora: `lr` must be a number, got 'abc'" in errors
    assert "fft: `lora_dropout` must be in [0, 1), got 2.0" in errors
    assert "`dora.lr` is for method dora, which is not in methods=fft,lora" in errors
    assert any(m.startswith("`sgd.lr`: 'sgd' is not a method") for m in errors)
    assert any(m.startswith("`method` is set per run by compare") for m in errors)
    assert "`lora.output_dir`: `output_dir` cannot be set per method" in errors


def test_gamma_checked_against_the_model_for_sampling_methods_only(tmp_path, tiny_model_dir, tiny_data):
    with pytest.raises(ConfigError) as e:
        plan_compare(None, overrides(*tiny_keys(tiny_model_dir, tiny_data, tmp_path), "methods=fft,lisa", "gamma=9"))
    assert e.value.errors == ["lisa: `gamma` must be between 1 and 4 (the model has 4 decoder blocks), got 9"]


def test_per_method_budget_change_is_flagged(tmp_path, tiny_model_dir, tiny_data):
    plan = plan_compare(None, overrides(*tiny_keys(tiny_model_dir, tiny_data, tmp_path), "methods=fft,lora",
                                        "lora.max_steps=8"))
    assert plan.warnings and "`lora.max_steps` differs from the shared setting" in plan.warnings[0]


def test_compare_cli_reports_config_errors_without_running(tmp_path, capsys):
    assert main(["compare", "methods=fft,nope", f"output_dir={tmp_path / 'cmp'}"]) == 2
    err = capsys.readouterr().err
    assert "grass-ft compare: error:" in err and "`methods` must be a comma-separated list" in err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("stderr, rc, expected", [
    ("loading...\ngrass-ft train: error: invalid configuration:\n  - `lr` must be > 0, got 0.0\n",
     2, "invalid configuration: - `lr` must be > 0, got 0.0"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n", 1, "RuntimeError: boom"),
    ("bar 10%\rbar 50%\r", 1, "bar 50%"),
    ("", -9, "killed by signal 9 (out of memory?)"),
    ("", 3, "exited with code 3 and no message"),
])
def test_error_message_is_one_line(stderr, rc, expected):
    assert error_message(stderr, rc) == expected


# ------------------------------------------------------------------------------------- table and charts


def test_activity_matrix_from_events_and_from_metrics():
    events = [{"step": 2, "event": "probe", "active": [], "mgn": [1, 2, 3], "probs": [0.3] * 3},
              {"step": 2, "event": "draw", "active": [0, 2], "mgn": [1, 2, 3], "probs": [0.3] * 3},
              {"step": 4, "event": "draw", "active": [1], "mgn": [1, 2, 3], "probs": [0.3] * 3}]
    m = activity_matrix(events, [], steps=6)
    assert m == [[PROBE, PROBE, TRAINED, TRAINED, FROZEN, FROZEN],
                 [PROBE, PROBE, FROZEN, FROZEN, TRAINED, TRAINED],
                 [PROBE, PROBE, TRAINED, TRAINED, FROZEN, FROZEN]]
    metrics = [{"step": 0, "probe": True, "active": []}, {"step": 1, "probe": False, "active": [1]}]
    assert activity_matrix([], metrics, steps=2) == [[PROBE, FROZEN], [PROBE, TRAINED]]
    assert activity_matrix([], [{"step": 0, "active": []}], steps=1) is None  # fft, lora: nothing drawn


def test_results_markdown_has_units_and_errors():
    rows = [{"method": "grass", "accuracy": 0.25, "accuracy_before": 0.125, "eval_loss": 1.5, "eval_loss_before": 2.0,
             "final_train_loss": 1.4, "peak_memory_bytes": 3 * 2 ** 30, "optimizer_state_bytes": 2 ** 21,
             "optimizer_state_device_bytes": 0, "optimizer_state_host_bytes": 2 ** 21, "trainable_params": 1000,
             "total_params": 4000, "tokens_per_s": 1234.5, "s_per_step": 0.5, "mgn_bookkeeping_fraction": 0.03,
             "wall_s": 12.0, "error": None},
            {"method": "lora", "error": "`lora_target_modules` 'x|y' matches no module", "wall_s": 3.0}]
    md = results_markdown(rows, {"model": "m", "max_steps": 4})
    for unit in ("accuracy, %", "nats/token", "peak memory, GiB", "optimizer state, MiB (device + host)",
                 "tokens/s", "s/step", "MGN bookkeeping, % of step time", "run wall time, s"):
        assert unit in md
    assert "| `grass` | 12.5 → 25.0 | 2.0000 → 1.5000 | 1.4000 | 3.000 | 0.00 + 2.00 | 1,000 (25.0%) | 1,234 " in md
    assert "| `lora` | – |" in md and "'x\\|y' matches no module" in md  # a | in an error cannot break the table
    assert "model `m`, max_steps `4`" in md


def test_plot_rejects_a_directory_without_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is neither a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end


def _png_ok(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_all_six_methods(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are subprocesses: one thread each, like the tests
    out = tmp_path / "cmp"
    assert main(["compare", "--quiet", f"methods={','.join(SIX)}", *tiny_keys(tiny_model_dir, tiny_data, out),
                 "lora.lr=1e-3"]) == 0
    printed = capsys.readouterr().out
    for i, m in enumerate(SIX, 1):
        assert f"[{i}/6] {m}: training" in printed and f"[{i}/6] {m}: accuracy" in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == SIX
    for r in rows:
        assert r["error"] is None and r["status"] == "ok", r
        for k in ("accuracy", "eval_loss", "peak_memory_bytes", "optimizer_state_bytes", "tokens_per_s",
                  "trainable_params"):
            assert r[k] is not None, (r["method"], k)
        assert (out / r["method"] / "summary.json").is_file() and (out / r["method"] / "stderr.log").is_file()
    by = {r["method"]: r for r in rows}
    assert by["fft"]["trainable_params"] == by["fft"]["total_params"]
    assert 0 < by["lora"]["trainable_params"] < by["dora"]["trainable_params"] < by["fft"]["trainable_params"]
    assert by["grass"]["optimizer_state_device_bytes"] == 0 < by["grass"]["optimizer_state_host_bytes"]
    assert by["lisa"]["optimizer_state_host_bytes"] == 0 < by["lisa"]["optimizer_state_device_bytes"]
    assert (out / "lora" / "final" / "adapter_model.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert all(f"| `{m}` |" in md for m in SIX)
    for png in ("loss.png", "active_blocks.png", "mgn_grass.png", "summary.png"):
        assert _png_ok(out / png), png
        assert f"({png})" in md

    # a single run's charts
    assert main(["plot", str(out / "grass")]) == 0
    for png in ("loss.png", "active_blocks.png", "mgn.png"):
        assert _png_ok(out / "grass" / png), png


@pytest.mark.slow
def test_a_failing_method_is_reported_and_the_others_still_run(tmp_path, tiny_model_dir, tiny_data, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    # passes validation (the model is not loaded yet), fails inside the lora subprocess
    assert main(["compare", "--quiet", "methods=lora,fft", *tiny_keys(tiny_model_dir, tiny_data, out, max_steps=2),
                 "lora.lora_target_modules=no_such_proj"]) == 1
    printed = capsys.readouterr().out
    assert "[1/2] lora: FAILED" in printed and "failed: lora" in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "fft"]
    lora, fft = rows
    assert lora["status"] == "failed" and lora["accuracy"] is None and lora["returncode"] == 2
    assert lora["error"].startswith("`lora_target_modules` 'no_such_proj' matches no module of LlamaForCausalLM")
    assert fft["error"] is None and fft["accuracy"] is not None
    md = (out / "results.md").read_text()
    assert "matches no module" in md and "| `fft` |" in md
    assert _png_ok(out / "loss.png") and _png_ok(out / "summary.png")
