"""FSDP2 (fsdp=true) in the native loop on CPU with gloo (torchrun, 2 processes): same result as one unsharded
process with the same global batch, identical traces, only the active blocks' gradients reduce-scattered, exact
resume from a DCP checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import (GRAD_NORM_RTOL, equal_length_data, first_update_norms, jsonl, keys, lockstep,
                              one_and_two_processes, torchrun, weights)

from grass_ft.config import ConfigError, TrainConfig, build_config
from grass_ft.method.methods import method_names, prepare
from grass_ft.model import block_layout
from grass_ft.run.train import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return one_and_two_processes(tiny_model_dir, tmp_path_factory.mktemp("fsdp"), fsdp="true")


# The comparisons are test_distributed's, for the same reason (the derivation is there): FSDP2 reduce-scatters the
# two ranks' mean gradients and divides by 2 (exact), so the arithmetic differs from one process only in the fp32
# rounding of the per-rank partial sums, plus the order of the sum of squares over the shards in the clipping norm
# and the per-block norm (one extra rounding of a sum of 2 terms, ~u relative). End to end: the first update's
# norm (equal weights before it); in lockstep (tests/dist_lockstep_worker.py, equal weights before every step):
# every step's gradients, gathered from the shards. A missing or wrong reduce-scatter (each rank keeping its own
# half-batch gradient) changes the gradients by O(1): checked by mutating CountingReduceScatter to copy its shard
# of the input instead of reducing it (docs/DISTRIBUTED.md).
def test_fsdp_two_processes_equal_one_with_same_global_batch(runs):
    _, _, one, two = runs
    first_update_norms(one, two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["offload"] is True


def test_fsdp_two_processes_compute_one_process_gradients_in_lockstep(tmp_path):
    res = lockstep(tmp_path, "grass", "fsdp")
    assert res["compared"] == 8 and len({tuple(a) for a in res["draws"] if a}) >= 2


def test_fsdp_identical_traces_and_same_draws_as_one_process(runs):
    _, _, one, two = runs
    rank0, rank1 = jsonl(two / "layers.jsonl"), jsonl(two / "layers.rank1.jsonl")
    assert rank0 == rank1  # MGN from the all-reduced per-block sums: the same floats on both ranks
    draws = [tuple(e["active"]) for e in rank0 if e["event"] == "draw"]
    assert len(draws) == 4 and len(set(draws)) >= 2
    assert [tuple(e["active"]) for e in jsonl(one / "layers.jsonl") if e["event"] == "draw"] == draws


def padded_bytes(params: list[torch.Tensor], world_size: int = 2) -> int:
    """What FSDP2 puts into a reduce-scatter for these parameters: dim 0 padded to a multiple of the ranks."""
    return sum(-(-p.shape[0] // world_size) * world_size * (p.numel() // p.shape[0]) * p.element_size()
               for p in params)


def test_fsdp_reduce_scatter_bytes_are_the_active_blocks(runs, tiny_model_dir):
    _, _, _, two = runs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layout = block_layout(model)
    params = dict(model.named_parameters())
    per_block = [padded_bytes([params[n] for n in names]) for names in layout.blocks]
    always = prepare(model, TrainConfig(method="grass", gamma=2)).always  # the default: embeddings, norm, head
    assert always
    for m in jsonl(two / "metrics.jsonl"):
        # measured in the reduce-scatter FSDP2 calls: every block during the probe (nothing else trains there), the
        # drawn ones and the root unit's embeddings/final norm/head after; the frozen blocks send nothing
        blocks = range(layout.num_blocks) if m["probe"] else m["active"]
        root = 0 if m["probe"] else padded_bytes([params[n] for n in always])
        assert m["reduce_scatter_bytes"] == sum(per_block[b] for b in blocks) + root, m["step"]
        # plus the per-block squared norms, one float64 per block read (all during the probe, the drawn after)
        assert m["allreduce_bytes"] == 8 * len(blocks), m["step"]


def test_fsdp_resume_from_dcp_checkpoint_is_exact(runs, tiny_model_dir):
    tmp, data, _, two = runs
    ckpt = two / "checkpoint-4"
    assert (ckpt / ".metadata").is_file() and sorted(p.name for p in ckpt.glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-4")
    for log in ("metrics.jsonl", "layers.jsonl"):
        shutil.copy(two / log, resumed / log)
    torchrun(keys(tiny_model_dir, data, resumed, batch_size=2, fsdp="true", save_steps=4, resume="auto"))
    w, ref = weights(resumed), weights(two)
    for k in ref:  # the same ops on the same shards, in the same order: bit-identical
        torch.testing.assert_close(w[k], ref[k], rtol=0, atol=0, msg=k)
    assert jsonl(resumed / "layers.jsonl") == jsonl(two / "layers.jsonl")
    strip = ("s_per_step", "tokens_per_s", "bookkeeping_s", "peak_memory_bytes")
    assert ([{k: v for k, v in m.items() if k not in strip} for m in jsonl(resumed / "metrics.jsonl")]
            == [{k: v for k, v in m.items() if k not in strip} for m in jsonl(two / "metrics.jsonl")])


def test_fsdp_with_the_default_method_equals_one_process(tiny_model_dir, tmp_path):
    """grass-uniform (uniform draws, embeddings and head trained, offloaded state) under FSDP2 in two processes: the
    same draws as one unsharded process, the first update's norm end to end, every step's gradients in lockstep."""
    _, _, one, two = one_and_two_processes(tiny_model_dir, tmp_path, method="grass-uniform", fsdp="true")
    m1, m2 = jsonl(one / "metrics.jsonl"), jsonl(two / "metrics.jsonl")
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=GRAD_NORM_RTOL)  # no probe: step 0 updates
    assert lockstep(tmp_path, "grass-uniform", "fsdp")["compared"] == 10
    draws = [tuple(e["active"]) for e in jsonl(two / "layers.jsonl") if e["event"] == "draw"]
    assert draws == [tuple(e["active"]) for e in jsonl(one / "layers.jsonl") if e["event"] == "draw"]
    assert len(draws) == 5 and len(set(draws)) >= 2  # no probe: a draw every 2 of the 10 steps
    assert jsonl(two / "layers.jsonl") == jsonl(two / "layers.rank1.jsonl")


def test_fsdp_refuses_peft_methods_and_a_single_process(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"`fsdp` works with method grass, grass-static, lisa, fft, grass-uniform "
                                          r"\(not lora"):
        build_config(None, keys(tiny_model_dir, tiny_data, tmp_path / "a", method="lora", fsdp="true"),
                     known_methods=method_names())
    cfg = build_config(None, keys(tiny_model_dir, tiny_data, tmp_path / "b", fsdp="true"), known_methods=method_names())
    with pytest.raises(ConfigError, match="`fsdp` shards over two or more processes"):
        run_train(cfg, progress=False)


def test_fsdp_fft_shards_the_root_unevenly_and_matches_one_process(tiny_model_dir, tmp_path):
    # fft trains the root unit too: the embedding and head have 103 rows, split 52/51 over the ranks (FSDP2 pads
    # the reduce-scatter input to 104), so the optimizer works on uneven shards. With grad_accum=2 and activation
    # checkpointing (recomputation inside FSDP2's units); the global batch is 4 in both runs. Each micro-batch's
    # gradient is reduce-scattered and accumulated in the shard, a sum of the same terms as one process's
    # accumulation: the first update's norm end to end, and every step in lockstep (the bound above).
    # Both runs hold out the same 8 examples: the sharded model is evaluated before and after training by both ranks
    # together (rank 0 keeps the figures), which must be what one process computes with the same weights.
    data = equal_length_data(tmp_path / "eq.jsonl")
    base = {"method": "fft", "max_steps": 4, "grad_accum": 2, "gradient_checkpointing": "true", "eval_samples": 8,
            "max_new_tokens": 4}
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(build_config(None, keys(tiny_model_dir, data, one, batch_size=2, **base), known_methods=method_names()),
              progress=False)
    torchrun(keys(tiny_model_dir, data, two, batch_size=1, fsdp="true", **base))
    m1, m2 = jsonl(one / "metrics.jsonl"), jsonl(two / "metrics.jsonl")
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=GRAD_NORM_RTOL)  # fft: step 0 updates
    assert lockstep(tmp_path, "fft", "fsdp", "accum=2", "checkpointing")["compared"] == 10
    from transformers import AutoModelForCausalLM

    everything = padded_bytes(list(AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()))
    # every parameter's gradient, once per micro-batch
    assert [m["reduce_scatter_bytes"] for m in jsonl(two / "metrics.jsonl")] == [2 * everything] * 4
    # The evaluations: the same weights in one process and sharded over two give the same eval loss up to the order
    # of fp32 sums (the all-gathered weights are exact copies; a mean over ~100 tokens of NLLs from logits reduced
    # over K <= 64, first order 64 u ~ 4e-6 relative): rtol 1e-5. Before: the model as loaded, in both runs. After:
    # the sharded model against its gathered final/ in one process; after 4 fft updates at lr 1e-2 the loss has
    # moved by far more than that, so an evaluation of the wrong weights fails.
    from grass_ft.run.held_out import evaluate_run_model

    s1, s2 = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert s2["eval_n"] == s1["eval_n"] == 8
    assert s2["eval_loss_before"] == pytest.approx(s1["eval_loss_before"], rel=1e-5)
    again = evaluate_run_model(two / "final", tmp_path / "again", progress=False)
    assert s2["eval_loss"] == pytest.approx(again["eval_loss"], rel=1e-5)
    assert abs(s2["eval_loss"] - s2["eval_loss_before"]) > 1e-3


def test_fsdp_loads_the_weights_on_rank_0_only_and_each_rank_keeps_its_shard(tiny_model_dir, tmp_path):
    """With fsdp=true rank 0 alone reads the weights; every rank builds the model on the meta device, shards it and
    receives its rows from rank 0, so no rank holds the whole model on its device (a 70B model would not fit one
    GPU). Gathered back, the weights and buffers are the files' exactly (copies, no arithmetic). A broken model
    stops both ranks with rank 0's line."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"  # a non-finite weight: refused by rank 0, and so by every rank
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "fsdp_load_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(worker),
                        str(tmp_path), str(tiny_model_dir), str(broken)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    (r0, b0), (r1, b1) = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))

    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["reads"] == [str(tiny_model_dir)] and r1["reads"] == []
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    full = torch.load(tmp_path / "full0.pt")
    assert sorted(full) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k
    total = sum(p.numel() for p in ref.parameters())
    assert r0["local_numel"] + r1["local_numel"] == total and max(r0["local_numel"], r1["local_numel"]) < 0.51 * total
    for name, buffer in ref.named_buffers():  # the rotary frequencies: not in a state dict, rank 0's on both
        assert r0["buffers"][name] == r1["buffers"][name] == buffer.tolist(), name

    assert b0["error"] == b1["error"] and b0["error"].startswith(f"ModelError: model '{broken}' holds weights that "
                                                                 "are not finite (model.layers.1.mlp.up_proj.weight")
    assert b0["reads"] == [str(broken)] and b1["reads"] == []


def test_fsdp_damaged_dcp_checkpoint_is_detected(runs, tmp_path):
    from grass_ft.run.checkpoint import checkpoint_problem, find_checkpoint

    _, _, _, two = runs
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(two / "checkpoint-4", ckpt)
    assert checkpoint_problem(ckpt) is None
    shard = ckpt / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a killed copy
    written = (two / "checkpoint-4" / shard.name).stat().st_size
    assert checkpoint_problem(ckpt) == f"__1_0.distcp has 100 bytes, {written} were written"
    shard.unlink()
    assert checkpoint_problem(ckpt) == "missing __1_0.distcp"
    shutil.copytree(two / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / ".metadata").write_bytes(b"")  # truncated: resume=auto falls back to an older one
    warnings: list[str] = []
    with pytest.raises(Exception, match="every checkpoint .* is damaged"):
        find_checkpoint(tmp_path, "auto", warnings)
