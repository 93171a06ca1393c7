"""The CUDA paths a CPU run does not reach (issue 29): one test per defect a review of them found.

On the CPU a stand-in plays the GPU: the meta device as the parameters' device (anything that is not the host
counts as a device copy), a patched device count or registration call, fake CUDA events. The ``gpu``-marked tests
run the real paths where a GPU is (``benchmarks/gpu_check.sh`` runs them) and skip without one.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_llama

from grass_ft.run import checkpoint as ckpt
from grass_ft.method import offload
from grass_ft.parallel.distributed import Distributed, init_distributed

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(vocab: int = 103, n: int = 2, length: int = 16, device="cpu", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train_step(model, opt, batch) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process: FSDP2 and DCP run for real, on one rank."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cpu_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,))


# ---------------------------------------------------------------- 1. fused AdamW's `step` on the device


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-tensor"])
def test_fused_adamw_state_loads_onto_the_parameters_device(fused):
    """Fused (and capturable) AdamW refuses a CPU ``step`` beside CUDA parameters; the per-tensor AdamW keeps it on
    the host. The loader places each value as the optimizer kind expects; meta parameters stand in for CUDA ones."""
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    _train_step(model, opt, _batch())
    saved = ckpt.optimizer_state_by_name(opt, model)
    target = copy.deepcopy(model).to("meta")
    target_opt = torch.optim.AdamW(target.parameters(), lr=1e-3)  # its groups take the checkpoint's `fused`
    ckpt.load_optimizer_state_by_name(target_opt, target, saved, "checkpoint")
    assert len(target_opt.state) == len(list(target.parameters()))
    for p, state in target_opt.state.items():
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
        if fused:
            assert state["step"].device == p.device and state["step"].dtype == torch.float32
        else:
            assert state["step"].device.type == "cpu"


# ---------------------------------------------------- 2. FSDP checkpoints keep the optimizer state on the host


def _sharded_meta_llama():
    """A tiny Llama whose shards live on the meta device: a stand-in for a GPU, no memory, no values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from grass_ft.parallel.fsdp import shard_model

    cfg = LlamaConfig(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shard_model(model, mesh=_cpu_mesh())
    return model


def test_fsdp_checkpoint_keeps_the_optimizer_state_on_the_host(one_rank_group):
    from grass_ft.parallel.fsdp import (local, optimizer_state_from_dtensors, optimizer_state_template,
                               optimizer_state_to_dtensors)

    params = dict(_sharded_meta_llama().named_parameters())
    assert all(local(p).device.type == "meta" for p in params.values())
    state = {n: {"step": torch.tensor(3.0), "exp_avg": torch.randn(local(p).shape),
                 "exp_avg_sq": torch.rand(local(p).shape)} for n, p in params.items()}
    total = sum(v.nbytes for e in state.values() for v in e.values() if v.dim() > 0)

    def off_host(tree) -> int:  # bytes of state whose shard is not a host tensor
        return sum(local(v).nbytes for e in tree.values() for v in e.values()
                   if v.dim() > 0 and local(v).device.type != "cpu")

    wrapped = optimizer_state_to_dtensors(state, params)
    assert total > 0 and off_host(wrapped) == 0  # before the fix: every byte, copied onto the parameters' device
    for n, e in wrapped.items():  # no copy at all: DCP writes the host tensors themselves
        assert local(e["exp_avg"]).data_ptr() == state[n]["exp_avg"].data_ptr()
        assert e["exp_avg"].shape == params[n].shape and e["exp_avg"].placements == params[n].placements
    assert off_host(optimizer_state_template({n: sorted(e) for n, e in state.items()}, params)) == 0
    back = optimizer_state_from_dtensors(wrapped)
    assert all(back[n]["exp_avg"].data_ptr() == state[n]["exp_avg"].data_ptr() for n in state)


def test_fsdp_checkpoint_round_trip_through_the_host_mesh(one_rank_group, tmp_path):
    """DCP saves and loads the host-mesh DTensors (one rank; the 2-rank resume is tests/test_fsdp.py's)."""
    from grass_ft.parallel.fsdp import shard_model
    from grass_ft.method.offload import LayerwiseOffloadAdamW

    def build():
        model = tiny_llama(layers=2)
        shard_model(model, mesh=_cpu_mesh())
        opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)

    model, opt, sched = build()
    _train_step(model, opt, _batch())
    path = ckpt.save_sharded_checkpoint(tmp_path, 1, model, opt, sched, {}, {}, 0, is_main=True)
    model2, opt2, sched2 = build()
    ckpt.load_sharded_checkpoint(path, model2, opt2, sched2)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and a
    for n in a:
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k)


# ------------------------------------------------ 3. the pinned-memory fallback clears the CUDA error


class _FailingCudart:
    """``torch.cuda.cudart()`` whose ``cudaHostRegister`` fails (cudaErrorHostMemoryAlreadyRegistered)."""

    def __init__(self):
        self.calls = 0

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the CUDA name
        self.calls += 1
        return 712


def test_pinning_fallback_clears_the_cuda_error_and_warns_once(monkeypatch):
    cudart = _FailingCudart()
    cleared = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(offload, "_clear_last_cuda_error", lambda: cleared.append(True))
    monkeypatch.setattr(offload, "_pinned_empty", lambda n: torch.empty(n))  # a CPU build has no pinned allocator
    monkeypatch.setattr(offload, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slabs = [offload._pin(torch.empty(n)) for n in (10, 20)]
    assert cudart.calls == 2 and cleared == [True, True]  # every failed registration's error is read and reset
    assert [s.numel() for s in slabs] == [10, 20]
    said = [w for w in caught if "cudaHostRegister failed" in str(w.message)]
    assert len(said) == 1  # once per process, not once per slab


# ------------------------------------------------------ 4. fewer GPUs than processes: gloo on the CPU


def test_fewer_gpus_than_processes_fall_back_to_gloo(monkeypatch, capsys):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    d = init_distributed()
    assert calls == {"backend": "gloo"}  # before: nccl, and set_device(1) on a machine with GPU 0 only
    assert d.device() == torch.device("cpu") and d.world_size == 2 and d.rank == 1
    assert capsys.readouterr().err == ""  # local rank 0 says it, once per machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    init_distributed()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 processes on this machine but 1 CUDA device(s)" in err


# -------------------------------------------------- 5. the benchmark scripts import from a plain checkout

# Runs each script's --help in one interpreter with every installed grass_ft hidden (the editable install's path
# entry and setuptools' editable finders; `-I` drops PYTHONPATH), as in a fresh clone without `pip install -e .`.
# Before each script the project's modules are dropped again, so one script's import cannot serve the next.
_HELP_WORKER = r"""
import importlib.util, json, os, runpy, sys
roots = tuple(sys.argv[1].split(os.pathsep))  # the checkout's src/ and benchmarks/ (a .venv may be beside them)
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "grass_ft"))]
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
base, out = list(sys.path), {}
for script in sys.argv[2:]:
    sys.path[:] = base
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == "grass_ft" or str(getattr(mod, "__file__", "") or "").startswith(roots):
            del sys.modules[name]
    if importlib.util.find_spec("grass_ft") is not None:
        out[script] = "grass_ft is importable before the script runs"
        continue
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
        out[script] = "no exit"
    except SystemExit as e:
        out[script] = e.code
    except BaseException as e:
        out[script] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
"""


def test_every_benchmark_script_imports_from_a_plain_checkout(tmp_path):
    # the scripts (a __main__ block); helper modules such as frontier_data.py have no command line of their own
    scripts = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text())
    assert len(scripts) >= 9
    roots = os.pathsep.join(str(ROOT / d) for d in ("src", "benchmarks"))
    proc = subprocess.run([sys.executable, "-I", "-c", _HELP_WORKER, roots, *scripts], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    assert result == {s: 0 for s in scripts}  # before: ModuleNotFoundError in five of them


# ---------------------------------------------------------- 6. FSDP reduces bf16 gradients in fp32


def test_fsdp_reduces_gradients_in_fp32_by_default(monkeypatch):
    from grass_ft.parallel import fsdp

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mesh=None, mp_policy=None: policies.append(mp_policy))
    model = tiny_llama(layers=3).to(torch.bfloat16)
    fsdp.shard_model(model)
    assert len(policies) == 4  # every block, then the root
    assert all(p is not None and p.reduce_dtype == torch.float32 and p.param_dtype is None for p in policies)
    policies.clear()
    fsdp.shard_model(model, reduce_dtype=None)  # a user who asks for the gradients' own dtype
    assert all(p.reduce_dtype is None for p in policies)


# -------------------------------------------------------------------- 7. random state per rank


def _states(n: int) -> list[dict]:
    out = []
    for seed in range(n):
        torch.manual_seed(100 + seed)
        out.append({"torch": torch.get_rng_state()})
    return out


def test_rng_state_is_restored_per_rank():
    saved = {"per_rank": _states(2)}
    assert ckpt.set_rng_state(saved, rank=1, world_size=2) is None
    assert torch.equal(torch.get_rng_state(), saved["per_rank"][1]["torch"])  # before: every rank took rank 0's
    assert ckpt.set_rng_state(saved, rank=0, world_size=2) is None
    assert torch.equal(torch.get_rng_state(), saved["per_rank"][0]["torch"])
    assert ckpt.gather_rng_states()["per_rank"][0]["torch"].equal(torch.get_rng_state())  # one process: its own


def test_rng_state_on_another_world_size_warns():
    saved = {"per_rank": _states(2)}
    note = ckpt.set_rng_state(saved, rank=2, world_size=3)
    assert torch.equal(torch.get_rng_state(), saved["per_rank"][0]["torch"])  # rank 2 mod 2
    assert note is not None and "2 process(es)" in note and "has 3" in note and "data order" in note


def test_rng_state_of_more_gpus_than_this_run_sees(monkeypatch):
    """A checkpoint of the old format holds every GPU the saving process saw; a run that sees fewer restores its
    own device's and no other (set_rng_state_all failed on device indices that do not exist)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    gpu_states = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    note = ckpt.set_rng_state({"torch": torch.get_rng_state(), "cuda": gpu_states})
    assert note is None and len(restored) == 1 and restored[0] is gpu_states[0]


# ----------------------------------------------- 8. the FSDP run's final model is saved from the host


def test_fsdp_final_model_stays_on_the_host(one_rank_group, tiny_model_dir):
    from grass_ft.parallel.fsdp import shard_model
    from grass_ft.model import load_model
    from grass_ft.run.finish import gathered_model as _gathered_model

    model = load_model(str(tiny_model_dir), "float32")
    shard_model(model, mesh=_cpu_mesh())
    cfg = SimpleNamespace(fsdp=True, model=str(tiny_model_dir), dtype="float32", attn_implementation="auto")
    full = _gathered_model(cfg, Distributed(), model)
    assert all(p.device.type == "cpu" for p in full.parameters())  # before: moved onto the device, whole
    loaded = load_model(str(tiny_model_dir), "float32")
    reference = loaded.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in full.state_dict().items())
    buffers = dict(full.named_buffers())  # the copy is built on meta: the rotary frequencies come from the shards'
    assert all(buffers[n].device.type == "cpu" and torch.equal(buffers[n], b) for n, b in loaded.named_buffers())


# ---------------------------------- 9. a CPU model with offload pins nothing and creates no CUDA context


def test_cpu_model_with_offload_pins_nothing(monkeypatch):
    registered = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, a model on the CPU
    monkeypatch.setattr(offload, "_register_pinned", lambda t: registered.append(t) or True)
    model = tiny_llama(layers=2)
    opt = offload.LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, offload=True)
    _train_step(model, opt, _batch())
    assert registered == [] and not opt.memory_report()["host_pinned"]  # before: the whole slab, registered
    assert not torch.cuda.is_initialized()


# -------------------------------------------- 10. a step's time includes its device work (CUDA events)


class _FakeEvent:
    """A CUDA event that records what is asked of it; each span is 250 ms on the fake device."""

    log: list[str] = []

    def __init__(self, enable_timing: bool = False):
        assert enable_timing

    def record(self, stream=None):
        _FakeEvent.log.append("record")

    def synchronize(self):
        _FakeEvent.log.append("synchronize")

    def elapsed_time(self, end):
        return 250.0


def test_step_time_is_measured_with_cuda_events_at_timed_steps_only(monkeypatch):
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare
    from grass_ft.method.step import StepClock, StepRunner

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    _FakeEvent.log = []
    prepared = prepare(tiny_llama(layers=2), TrainConfig(method="fft", lr=1e-3))
    runner = StepRunner(prepared, timed=lambda s: s == 2)
    runner.clock = StepClock(torch.device("cuda", 0))  # the runner of a model on a GPU
    results = [runner.train_step(s, [_batch(seed=s)]) for s in range(3)]
    # one synchronisation, at the timed step, after its closing event; none at the others
    assert _FakeEvent.log.count("synchronize") == 1 and _FakeEvent.log[-2:] == ["record", "synchronize"]
    assert results[2].seconds == 0.25 and results[2].wall_s > 0  # the events' span; the host's wall time beside
    assert all(r.seconds == r.wall_s for r in results[:2])  # untimed: the host clock


# ------------------------------------------------- the GPU check: each arm under its own bound, one line each


def _gpu_check(tmp_path, **hooks) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **hooks}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=300)
    return proc, proc.stdout.splitlines(), json.loads((out / "summary.json").read_text())


ARMS_AFTER_IMPORT = ["gpu_tests", "fused_adamw_resume", "pure_bf16", "pinning_fallback", "memory_tinyllama", "step_7b"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").is_file() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_gpu_check_bounds_each_arm_on_its_own(tmp_path):
    """Every arm past its bound is killed, with what it started, and fails alone: the next arm still runs
    (GPU_CHECK_* are the script's test hooks). Each bound is 2 s here, the import's its own; each arm first waits
    30 s beside a child of its own, so that it passes its bound on any machine."""
    proc, lines, summary = _gpu_check(tmp_path, GPU_CHECK_BOUNDS=",".join(f"{a}=2" for a in ARMS_AFTER_IMPORT),
                                      GPU_CHECK_STALL=",".join(f"{a}=30" for a in ARMS_AFTER_IMPORT))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    pids = [int(x) for x in (tmp_path / "out" / "stalled.pids").read_text().split()]
    assert len(pids) == len(ARMS_AFTER_IMPORT) and not any(_alive(p) for p in pids)  # each group killed whole
    assert lines[1].startswith("[gpu_check] import: ok (")
    for arm, line in zip(ARMS_AFTER_IMPORT, lines[2:-1], strict=True):
        assert line.startswith(f"[gpu_check] {arm}: fail (") and line.endswith("timed out after 2 s"), line
    assert lines[-1].startswith("[gpu_check] summary: 1 ok, 0 skip, 6 fail in ")
    # killed at the bound: 2 s, then at most the 5 s SIGTERM grace before SIGKILL, plus a loaded machine's start-up
    assert all(a["limit_s"] == 2 and a["seconds"] < 20 for a in summary["arms"][1:])


def test_gpu_check_skips_what_follows_a_failed_import_and_keeps_the_deadline(tmp_path):
    proc, lines, summary = _gpu_check(tmp_path / "a", GPU_CHECK_BOUNDS="import=1", GPU_CHECK_STALL="import=30")
    assert proc.returncode == 1 and lines[1].endswith("import: fail (1 s of 1 s): timed out after 1 s")
    assert all(ln.endswith(": the import check failed") and ": skip (" in ln for ln in lines[2:-1])
    assert len(lines) == 9 and summary["fail"] == 1 and summary["skip"] == 6
    # a deadline that leaves less than 15 s before its 5 s reserve: no arm starts, each says why
    proc, lines, summary = _gpu_check(tmp_path / "b", GPU_CHECK_DEADLINE="19")
    assert proc.returncode == 0 and summary["skip"] == 7
    assert all(": skip (0 s of " in ln and "s left of the 19 s deadline" in ln for ln in lines[1:-1])


# ================================================================================ on a GPU (gpu_check.sh)


def _cuda_fft(seed: int = 0):
    model = tiny_llama(seed=seed).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_adamw_load_then_step(tmp_path):
    """Defect 1: a fused AdamW loaded from a checkpoint takes its next step (it raised on the CPU ``step``), and
    that step is the one the uninterrupted optimizer takes (same gradients, same kernel)."""
    model, opt = _cuda_fft()
    _train_step(model, opt, _batch(device="cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, {}, 0)
    model2, opt2 = _cuda_fft(seed=1)
    ckpt.load_checkpoint(path, model2, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda k: 1.0))
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for m, o in ((model, opt), (model2, opt2)):
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        o.step()
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    assert all(s["step"].is_cuda for s in opt2.state.values())


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_adamw_resume_then_step(tiny_model_dir, tiny_data, tmp_path):
    """Defect 1 through the native loop: fft (fused AdamW on CUDA) checkpoints, resumes and steps to the end."""
    from grass_ft.config import build_config
    from grass_ft.method.methods import method_names
    from grass_ft.method.step import StepRunner
    from grass_ft.run.train import run_train

    def cfg(**kw):
        keys = {"model": tiny_model_dir, "data": tiny_data, "output_dir": tmp_path, "method": "fft", "max_steps": 4,
                "batch_size": 2, "eval_samples": 0, "save_steps": 2, "lr": 1e-3, **kw}
        return build_config(None, {k: str(v) for k, v in keys.items()}, known_methods=method_names())

    original = StepRunner.train_step

    def stop_at_3(self, step, *a, **kw):
        if step == 3:
            raise KeyboardInterrupt  # after checkpoint-2
        return original(self, step, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepRunner, "train_step", stop_at_3)
        with pytest.raises(KeyboardInterrupt):
            run_train(cfg(), progress=False)
    summary = run_train(cfg(resume="auto"), progress=False)  # before the fix: fused AdamW raised at step 2
    assert summary["steps"] == 4 and (tmp_path / "final").is_dir()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3] and all(not x["skipped"] for x in lines)


@pytest.mark.gpu
@needs_cuda
def test_cuda_pinning_fallback_leaves_no_stale_error(monkeypatch):
    """Defect 3: a real failed cudaHostRegister (a null pointer) leaves a real error; the fallback clears it, so the
    next kernel launch does not report it, and the optimizer steps from torch's pinned memory."""
    real = torch.cuda.cudart()

    class Failing:
        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the CUDA name
            return real.cudaHostRegister(0, size, 0)  # a null pointer: cudaErrorInvalidValue, left as the last error

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Failing())
    monkeypatch.setattr(offload, "_fallback_warned", False)
    model = tiny_llama(layers=2).cuda()
    with pytest.warns(UserWarning, match="cudaHostRegister failed"):
        opt = offload.LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3)
    torch.ones(4, device="cuda").add_(1)  # before the fix: "CUDA error: invalid argument", raised here
    _train_step(model, opt, _batch(device="cuda"))
    assert opt.memory_report()["host_pinned"] and all(s.is_pinned() for s in opt._slabs)


@pytest.fixture
def one_gpu_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@needs_cuda
def test_cuda_fsdp_checkpoint_copies_no_optimizer_state_to_the_gpu(one_gpu_group, tmp_path):
    """Defect 2: saving and loading an FSDP2 checkpoint of an offloaded optimizer allocates no device memory for its
    state (before: all of it, at once, for DCP)."""
    from torch.distributed.device_mesh import init_device_mesh

    from grass_ft.parallel.fsdp import shard_model
    from grass_ft.method.offload import LayerwiseOffloadAdamW

    model = tiny_llama(layers=4, hidden=256).cuda().to(torch.bfloat16)
    shard_model(model, mesh=init_device_mesh("cuda", (1,)))
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    _train_step(model, opt, _batch(device="cuda"))
    state_bytes = opt.memory_report()["host_state_bytes"]
    weight_bytes = sum(p.to_local().nbytes for p in model.parameters())
    torch.cuda.synchronize()  # only to read the allocator's statistics at a quiet point
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    path = ckpt.save_sharded_checkpoint(tmp_path, 1, model, opt, sched, {}, {}, 0, is_main=True)
    ckpt.load_sharded_checkpoint(path, model, opt, sched)
    torch.cuda.synchronize()  # every copy of the save and the load is done before the peak is read
    grown = torch.cuda.max_memory_allocated() - base
    # Before the fix every state tensor was on the device at once inside dcp.save: grown >= state_bytes, 12 B per
    # parameter (moments and fp32 master). Now at most the weights (2 B per parameter, bf16) may be staged there.
    assert state_bytes == 6 * weight_bytes and grown <= weight_bytes, (grown, weight_bytes, state_bytes)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fsdp_final_model_stays_on_the_host_and_gradients_reduce_in_fp32(one_gpu_group, tiny_model_dir):
    """Defects 8 and 6 on a GPU: the gathered final model is not moved onto the device; bf16 shards carry the fp32
    reduce dtype."""
    from torch.distributed.device_mesh import init_device_mesh

    from grass_ft.parallel.fsdp import shard_model
    from grass_ft.model import load_model
    from grass_ft.run.finish import gathered_model as _gathered_model

    model = load_model(str(tiny_model_dir), "bfloat16").cuda()
    shard_model(model, mesh=init_device_mesh("cuda", (1,)))
    assert all(s._mp_policy.reduce_dtype == torch.float32 for s in
               (m._get_fsdp_state() for m in model.modules() if hasattr(m, "_get_fsdp_state")))
    before = torch.cuda.memory_allocated()
    cfg = SimpleNamespace(fsdp=True, model=str(tiny_model_dir), dtype="bfloat16", attn_implementation="auto")
    full = _gathered_model(cfg, Distributed(), model)
    assert all(p.device.type == "cpu" for p in full.parameters())
    full_bytes = sum(p.nbytes for p in full.parameters())
    assert torch.cuda.memory_allocated() - before < full_bytes / 2  # before the fix: the whole copy, full_bytes


@pytest.mark.gpu
@needs_cuda
def test_cuda_fewer_gpus_than_processes_fall_back_to_gloo(monkeypatch):
    """Defect 4 with this machine's real device count: one process more than GPUs."""
    calls = {}
    n = torch.cuda.device_count()
    for k, v in {"WORLD_SIZE": n + 1, "RANK": n, "LOCAL_RANK": n, "LOCAL_WORLD_SIZE": n + 1}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    assert init_distributed().device() == torch.device("cpu") and calls == {"backend": "gloo"}


@pytest.mark.gpu
@needs_cuda
def test_cuda_rng_state_per_rank_with_more_gpus_saved_than_seen():
    """Defect 7: this device's CUDA state is saved and restored; a record of more GPUs than this run sees loads."""
    torch.cuda.manual_seed(3)
    torch.randn(1, device="cuda")
    saved = ckpt.gather_rng_states()
    expected = torch.randn(4, device="cuda")
    assert ckpt.set_rng_state(saved) is None
    assert torch.equal(torch.randn(4, device="cuda"), expected)
    mine = saved["per_rank"][0]
    old = {"torch": mine["torch"], "cuda": [mine["cuda"]] * (torch.cuda.device_count() + 1)}
    assert ckpt.set_rng_state(old) is None  # before: set_rng_state_all raised on the device it does not have
    assert torch.equal(torch.randn(4, device="cuda"), expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_cpu_model_with_offload_creates_no_cuda_context():
    """Defect 9 in a fresh interpreter (this one has a CUDA context already)."""
    code = ("import torch, sys; sys.path.insert(0, sys.argv[1]); from tiny import tiny_llama; "
            "from grass_ft.offload import LayerwiseOffloadAdamW as A; m = tiny_llama(layers=2); "
            "o = A(m.named_parameters(), lr=1e-3); ids = torch.randint(3, 100, (2, 8)); "
            "m(input_ids=ids, labels=ids).loss.backward(); o.step(); "
            "print(int(torch.cuda.is_initialized()), int(o.memory_report()['host_pinned']))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "0"]


@pytest.mark.gpu
@needs_cuda
def test_cuda_step_time_includes_the_queued_optimizer_step():
    """Defect 10: a timed step waits for its device work once (the stream is idle when it returns) and counts it;
    an untimed one adds no synchronisation (the stream is still busy with a 0.2 s kernel when it returns)."""
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare
    from grass_ft.method.step import StepRunner

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()  # to calibrate the sleep kernel: cycles per millisecond on this GPU
    cycles = int(10**7 * 200 / start.elapsed_time(end))  # 0.2 s
    prepared = prepare(tiny_llama(layers=2).cuda(), TrainConfig(method="fft", lr=1e-3))
    original = prepared.optimizer.step
    sleep = []

    def slow_step(*a, **kw):
        if sleep:
            torch.cuda._sleep(cycles)  # a long kernel queued by the update, as an offloaded step's copies are
        return original(*a, **kw)

    prepared.optimizer.step = slow_step
    runner = StepRunner(prepared, timed=lambda s: s == 2)
    runner.train_step(0, [_batch(device="cuda")])  # warm-up: the first launches (cuBLAS, lazy modules) not timed
    sleep.append(True)
    runner.train_step(1, [_batch(device="cuda", seed=1)])
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()  # only to start the timed step on an idle device
    timed = runner.train_step(2, [_batch(device="cuda", seed=2)])
    assert busy and torch.cuda.current_stream().query()
    # the span holds the 0.2 s kernel (calibrated to within a few per cent: 0.15 leaves a margin); the host clock
    # starts before the start event is recorded and stops after the end event completed, so wall >= span (up to
    # the events' resolution, about half a microsecond: 1 ms of slack)
    assert timed.seconds >= 0.15 and timed.wall_s >= timed.seconds - 1e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["fft", "grass"])
def test_cuda_pure_bf16_without_masters(method):
    """master_weights=false on CUDA: fft is torch's fused AdamW on bf16 (moments bf16), grass our offloaded
    optimizer without masters (fp32 moments on the host, none kept for the weights); both step and move weights."""
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare
    from grass_ft.method.step import StepRunner

    model = tiny_llama(layers=4).cuda().to(torch.bfloat16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(method=method, master_weights=False, dtype="bfloat16", gamma=2, probe_steps=1, lr=1e-2,
                      probe_mode="measure")
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared, max_grad_norm=1.0)
    for s in range(4):
        res = runner.train_step(s, [_batch(device="cuda", seed=s)])
        assert not res.skipped
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, w0[n])]
    assert moved
    if method == "fft":
        assert prepared.optimizer.param_groups[0]["fused"]
        assert all(s["exp_avg"].dtype == torch.bfloat16 and s["step"].is_cuda
                   for s in prepared.optimizer.state.values())
    else:
        state = prepared.optimizer.state_dict()["state"]
        assert state and all("master" not in e for e in state.values())
        assert prepared.optimizer.memory_report()["device_state_bytes"] == 0
