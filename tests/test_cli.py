"""Bad input: one clear error naming the key, value or file line; no traceback; nothing left as if finished."""

import subprocess
import sys

import pytest

from grass_ft.frontends.cli import main


def err(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("args, message", [
    (["foo=1"], "unknown key `foo`"),
    (["gama=3"], "unknown key `gama`"),
    (["gamma=abc"], "`gamma` must be an integer, got 'abc'"),
    (["train_head=maybe"], "`train_head` must be true or false, got 'maybe'"),
    (["tau=0"], "`tau` must be > 0, got 0.0"),
    (["tau=-1"], "`tau` must be > 0, got -1.0"),
    (["alpha=0"], r"`alpha` must be in \(0, 1\], got 0.0"),
    (["alpha=1.5"], r"`alpha` must be in \(0, 1\], got 1.5"),
    (["method=sgd"], "`method` must be auto or one of grass, grass-static, lisa, fft"),
    (["gamma=0"], "`gamma` must be at least 1, got 0"),
    (["lr_schedule=step"], "`lr_schedule` must be one of constant, linear, cosine, got 'step'"),
    (["data=/nonexistent/train.jsonl"], "`data` file '/nonexistent/train.jsonl' does not exist"),
    (["task=nosuchtask"], "no answer rule for task 'nosuchtask'"),
    (["method=grass-static", "probe_steps=0"], "`probe_steps` must be >= 1 for method grass-static"),
    (["method=grass", "max_steps=5", "probe_steps=5", "probe_mode=measure"],  # the paper's probe updates nothing
     "`probe_steps` must be below max_steps=5"),
    (["gamma"], "argument 'gamma' is not key=value"),
])
def test_bad_config_single_error(capsys, args, message):
    out = err(capsys, "validate", *args)
    assert len(pytest.importorskip("re").findall(message, out)) == 1, out


def test_every_error_reported_at_once(capsys):
    out = err(capsys, "validate", "foo=1", "gamma=x", "tau=0", "alpha=3")
    for m in ("unknown key `foo`", "`gamma` must be an integer", "`tau` must be > 0", "`alpha` must be in (0, 1]"):
        assert m in out


def test_yaml_errors(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("gamma: [1, 2]\ntau: 0\nnope: 1\n")
    out = err(capsys, "validate", "--config", str(bad))
    assert "`gamma` must be an integer, got [1, 2]" in out and "unknown key `nope`" in out
    bad.write_text("- a\n- b\n")
    assert "expected a mapping" in err(capsys, "validate", "--config", str(bad))
    ok = tmp_path / "ok.yaml"
    ok.write_text("gamma: 2\ntau: 0.5\n")
    assert main(["validate", "--config", str(ok), "gamma=3"]) == 0
    cap = capsys.readouterr()
    assert "method auto" in cap.out and "warning" not in cap.err  # the default: auto may choose a sampling method
    assert main(["validate", "--config", str(ok), "gamma=3", "method=fft"]) == 0
    cap = capsys.readouterr()
    assert "method fft" in cap.out  # a method that ignores gamma and tau -- and says so
    assert ("grass-ft validate: warning: gamma=3, tau=0.5: for the layer-sampling methods only; method=fft trains "
            "every parameter and ignores them (method=grass-uniform trains gamma blocks at a time)") in cap.err


def test_layer_sampling_keys_at_their_defaults_or_with_a_sampling_method_draw_no_warning(capsys):
    for argv in ([], ["method=grass-uniform", "gamma=3"], ["method=lora", "lora_r=8"]):
        assert main(["validate", *argv]) == 0
        assert "warning" not in capsys.readouterr().err
    assert main(["validate", "method=lora", "sample_interval=5"]) == 0
    assert ("warning: sample_interval=5: for the layer-sampling methods only; method=lora trains every adapter "
            "and ignores it") in capsys.readouterr().err


def test_gamma_larger_than_block_count(tiny_model_dir, capsys):
    out = err(capsys, "validate", f"model={tiny_model_dir}", "method=grass-uniform", "gamma=9")
    assert "`gamma` must be between 1 and 4 (the model has 4 decoder blocks), got 9" in out


def _train_args(model, out, data, **extra):
    kv = {"model": model, "data": data, "output_dir": out, "max_steps": 3, "batch_size": 2, "eval_samples": 0,
          "gamma": 2, "probe_steps": 1, **extra}
    return ["train", "--quiet", *[f"{k}={v}" for k, v in kv.items()]]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r":2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r":2: missing or non-string key\(s\) output"),
    ('[{"instruction": "a", "output": "b"}, 3]', r"entry 1: expected a JSON object"),
])
def test_bad_data_file_names_line_and_leaves_previous_run(tmp_path, tiny_model_dir, capsys, content, message):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)  # a previous run, which this one may replace only once it can start
    (out / "summary.json").write_text("{}")
    msg = err(capsys, *_train_args(tiny_model_dir, out, data, overwrite_output_dir="true"))
    assert str(data) in msg and "\n" not in msg.strip()
    assert pytest.importorskip("re").search(message, msg), msg
    assert sorted(p.name for p in out.iterdir()) == ["final", "summary.json"]


def test_unwritable_output_dir(tmp_path, tiny_model_dir, tiny_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = err(capsys, *_train_args(tiny_model_dir, blocker / "run", tiny_data))
    assert f"`output_dir` '{blocker / 'run'}' is not writable" in msg


def test_missing_model_dir(tmp_path, tiny_data, capsys):
    msg = err(capsys, *_train_args(str(tmp_path / "nomodel"), tmp_path / "run", tiny_data))
    assert "model directory" in msg and "does not exist" in msg
    assert not (tmp_path / "run" / "final").exists()


def test_console_script_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "grass_ft.cli", "validate", "tau=0", "foo=bar"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "`tau` must be > 0" in r.stderr and "unknown key `foo`" in r.stderr


def test_train_help_lists_every_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("gamma", "tau", "alpha", "probe_steps", "sample_interval", "update_interval", "train_embeddings",
                "train_head", "layers_attribute", "train_on_inputs", "eval_samples"):
        assert f"  {key} " in out


def _two_task_eval(tmp_path):
    import json

    rows = [{"instruction": f"{a}+{a}=", "input": "", "output": f"Twice {a} is {2 * a}. The answer is {2 * a}",
             "answer": str(2 * a), "task": "gsm_symbolic" if a % 2 else "basic_arithmetic"} for a in range(8)]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_loss_only_task_must_exist(tmp_path, tiny_model_dir, tiny_data, capsys):
    args = _train_args(tiny_model_dir, tmp_path / "run", tiny_data, eval_data=_two_task_eval(tmp_path),
                       eval_samples=8, eval_loss_only_tasks="gsm_symbolic,gsm")
    msg = err(capsys, *args)
    assert "`eval_loss_only_tasks`: 'gsm' is not a task of the held-out examples (their tasks: basic_arithmetic, gsm_symbolic)" in msg
    assert not (tmp_path / "run" / "final").exists()


def test_per_task_eval_and_loss_only_tasks(tmp_path, tiny_model_dir, tiny_data, capsys):
    import json

    args = _train_args(tiny_model_dir, tmp_path / "run", tiny_data, eval_data=_two_task_eval(tmp_path),
                       eval_samples=8, eval_loss_only_tasks="gsm_symbolic", eval_before="false", max_new_tokens=4)
    assert main(args) == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(s["eval_loss_per_task"]) == {"gsm_symbolic", "basic_arithmetic"} and s["eval_loss_per_task_before"] is None
    assert s["eval_loss_before"] is None and s["accuracy_before"] is None
    assert set(s["accuracy_per_task"]) == {"basic_arithmetic"}  # gsm_symbolic was scored by loss only, never generated
    preds = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 4 and all(json.loads(p)["task"] == "basic_arithmetic" for p in preds)
