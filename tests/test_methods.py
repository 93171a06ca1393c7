"""Every method on a tiny Llama: what trains, what the summary counts, LoRA/DoRA adapters that load back, and where
the optimizer state lives (LISA keeps every drawn block's state on the device, offloaded GRASS keeps none)."""

import json

import pytest
import torch
from torch import nn

from grass_ft.config import TrainConfig
from grass_ft.method.methods import method_names, prepare
from grass_ft.method.offload import RING_SLOTS
from grass_ft.method.step import StepRunner, optimizer_state_bytes
from grass_ft.run.loop import trainable_count as _trainable_count
from grass_ft.run.train import run_train, save_final
from test_step import batches
from tiny import char_tokenizer, tiny_llama

L = 4
R = 4


def lora_expected(model: nn.Module, r: int) -> tuple[int, int]:
    """(LoRA parameters, DoRA magnitude parameters) for every linear layer but the LM head ("all-linear")."""
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    return sum(r * (m.in_features + m.out_features) for m in linears), sum(m.out_features for m in linears)


def numel(model, names):
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def trainable_at(runner: StepRunner, step: int) -> set[str]:
    for t in range(step + 1):  # the sampler draws at its schedule's steps: walk it from step 0
        runner.begin_step(t)
    return {n for n, p in runner.p.model.named_parameters() if p.requires_grad}


def test_every_method_is_registered():
    assert set(method_names()) >= {"fft", "lora", "dora", "lisa", "grass", "grass-static"}


@pytest.mark.parametrize("method", ["fft", "lora", "dora", "lisa", "grass", "grass-static"])
def test_trainable_parameters_per_method(method):
    model = tiny_llama(layers=L)
    total = sum(p.numel() for p in model.parameters())
    lora_n, magnitudes = lora_expected(model, R)
    cfg = TrainConfig(method=method, gamma=2, probe_steps=1, lora_r=R)
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared)
    names = trainable_at(runner, 1)  # a step after the probe
    got = numel(prepared.model, names)
    assert _trainable_count(prepared) == got  # what summary.json reports as trainable_params
    if method == "fft":
        assert got == total
    elif method in ("lora", "dora"):
        assert names and all("lora_" in n for n in names)
        assert got == lora_n + (magnitudes if method == "dora" else 0)
        assert {id(p) for g in prepared.optimizer.param_groups for p in g["params"]} == \
            {id(p) for n, p in prepared.model.named_parameters() if n in names}
    else:
        layout = prepared.layout
        blocks = sum(layout.numel[b] for b in prepared.sampler.active)
        always = numel(model, prepared.always)  # LISA always; the GRASS family by default (train_embeddings/head)
        assert always == numel(model, layout.embeddings + layout.head) > 0
        assert len(prepared.sampler.active) == 2
        assert got == blocks + always


def test_grass_trains_embeddings_and_head_when_switched_on():
    model = tiny_llama(layers=L)
    prepared = prepare(model, TrainConfig(method="grass", gamma=1, probe_steps=1, train_embeddings=True,
                                          train_head=True))
    names = trainable_at(StepRunner(prepared), 1)
    layout = prepared.layout
    assert set(layout.embeddings) | set(layout.head) <= names
    assert numel(model, names) == layout.numel[prepared.sampler.active[0]] + numel(model, layout.embeddings +
                                                                                   layout.head)


def test_dora_has_more_trainable_parameters_than_lora():
    counts = {}
    for m in ("lora", "dora"):
        p = prepare(tiny_llama(layers=L), TrainConfig(method=m, lora_r=R))
        counts[m] = sum(x.numel() for x in p.model.parameters() if x.requires_grad)
    assert 0 < counts["lora"] < counts["dora"]


def test_bad_target_modules_names_the_linear_modules():
    from grass_ft.model import ModelError

    with pytest.raises(ModelError, match=r"`lora_target_modules` 'nope_proj' matches no module of "
                                         r"LlamaForCausalLM; its linear modules are down_proj, gate_proj"):
        prepare(tiny_llama(layers=L), TrainConfig(method="lora", lora_target_modules="nope_proj"))


@pytest.mark.parametrize("key, value, message", [
    ("lora_r", 0, "`lora_r` must be >= 1, got 0"),
    ("lora_alpha", -1.0, "`lora_alpha` must be > 0"),
    ("lora_dropout", 1.0, r"`lora_dropout` must be in \[0, 1\), got 1.0"),
    ("lora_target_modules", ", ,", "`lora_target_modules` must be comma-separated module names"),
])
def test_lora_keys_are_validated(key, value, message):
    from grass_ft.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config(overrides={key: value})


# ------------------------------------------------------------------------------------------ adapters


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_adapter_reproduces_the_trained_model(tmp_path, method):
    from peft import PeftModel

    tok = char_tokenizer()
    cfg = TrainConfig(method=method, lora_r=R, lr=1e-2, lora_dropout=0.1, model="unused")
    prepared = prepare(tiny_llama(len(tok), layers=L, seed=3), cfg)
    runner = StepRunner(prepared, max_grad_norm=1.0)
    for t, mbs in enumerate(batches(3)):
        runner.train_step(t, mbs)
    final = save_final(prepared.model, tok, tmp_path)  # what run_train calls
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    trained = _logits(prepared.model, ids)
    fresh = tiny_llama(len(tok), layers=L, seed=3)
    # training moved the adapters off their zero start: logits move by ~lr-sized updates (1e-2 x 3 steps), far
    # beyond allclose's default (rtol 1e-5, atol 1e-8)
    assert not torch.allclose(_logits(fresh, ids), trained)
    loaded = PeftModel.from_pretrained(fresh, final)
    # the saved adapter round-trips its fp32 values exactly and the same ops run: equal (the default float32
    # tolerance is headroom only); a missing or misnamed adapter tensor moves logits by O(the update) ~1e-2
    torch.testing.assert_close(_logits(loaded, ids), trained)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_run_train_saves_adapter_and_merged_model(tmp_path, tiny_model_dir, tiny_data, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(method=method, model=str(tiny_model_dir), data=str(tiny_data), max_steps=3, batch_size=2,
                      eval_samples=0, lr=1e-2, lora_r=R, merge_lora=True, output_dir=str(tmp_path / "run"))
    summary = run_train(cfg, progress=False)
    final = tmp_path / "run" / "final"
    lora_n, magnitudes = lora_expected(tiny_llama(layers=L), R)
    assert summary["trainable_params"] == lora_n + (magnitudes if method == "dora" else 0)
    assert summary["total_params"] > summary["trainable_params"]
    assert summary["merged_dir"] == str(final / "merged")
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert adapter_cfg["use_dora"] == (method == "dora") and adapter_cfg["r"] == R
    assert adapter_cfg["lora_alpha"] == 2 * R
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(final / "merged"), ids)
    # merging sums W + (alpha/r)·B·A in fp32 before the matmul: one rounding per merged weight (u = 2**-24, of
    # |W| ~ 0.02) instead of a separate low-rank product added to the output; through the 4 blocks' matmuls
    # (K <= 64) the logits (|z| ~ 0.1-1) move by ~ 4 x 4 x 64 u |z| ~ 6e-5 |z| at first order -- under the
    # float32 default atol 1e-5 for |z| < 0.15, and in practice 1e-7 (the roundings do not align)
    torch.testing.assert_close(merged, adapter)


def test_fft_summary_counts_every_parameter(tmp_path, tiny_model_dir, tiny_data):
    cfg = TrainConfig(method="fft", model=str(tiny_model_dir), data=str(tiny_data), max_steps=2, batch_size=2,
                      eval_samples=0, output_dir=str(tmp_path / "run"))
    summary = run_train(cfg, progress=False)
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert summary["merged_dir"] is None


# ------------------------------------------------------------------------------- where the state lives


def test_lisa_device_state_grows_with_drawn_blocks_grass_offload_stays_off_device():
    layers, steps = 6, 10
    data = batches(steps)
    lisa = prepare(tiny_llama(layers=layers), TrainConfig(method="lisa", gamma=1, sample_interval=1, lr=1e-3))
    grass = prepare(tiny_llama(layers=layers), TrainConfig(method="grass", gamma=1, sample_interval=1,
                                                           probe_steps=1, lr=1e-3, probe_mode="measure"))
    assert not lisa.offload and grass.offload
    runners = {"lisa": StepRunner(lisa), "grass": StepRunner(grass)}
    seen: set[int] = set()
    lisa_device, grass_host = [], []
    layout = lisa.layout
    always = numel(lisa.model, lisa.always)
    for t in range(steps):
        r = runners["lisa"].train_step(t, data[t])
        seen |= set(r.active)
        state = optimizer_state_bytes(lisa.optimizer)
        # torch AdamW as shipped: exp_avg + exp_avg_sq (2 x fp32) of every block ever drawn stay on the device
        assert state["device"] == 8 * (always + sum(layout.numel[b] for b in seen))
        lisa_device.append(state["device"])
        runners["grass"].train_step(t, data[t])
        g = optimizer_state_bytes(grass.optimizer)
        assert g["device"] == 0  # between steps no GRASS optimizer state is on the device
        # a bounded step: the ring's three slots of the widest parameter's [exp_avg | exp_avg_sq] record (fp32) and
        # at most two chunk-wide fp32 temporaries (offload.py), whatever the number of blocks drawn so far
        widest = max(p.numel() for p in grass.model.parameters())
        assert g["peak_device"] <= (RING_SLOTS * 8 + 2 * 4) * widest
        assert (g["peak_device"] > 0) == (t > 0)  # the probe (step 0) updates nothing
        grass_host.append(g["host"])
    assert len(seen) >= 3 and lisa_device[-1] > lisa_device[0]
    # one host slab for every candidate block, allocated up front (offload.py): its size never changes
    assert grass_host == [8 * (numel(grass.model, grass.always) + sum(layout.numel))] * steps


def test_registry_capabilities_match_what_the_builders_do():
    """grass_ft.registry declares each method's capabilities once; the builders must do what it says (a sampler of
    the declared kind, the declared default offload), and a builder needs a registry row."""
    from grass_ft.method.methods import register_method
    from grass_ft.base.registry import METHODS, traits

    assert method_names() == list(METHODS)
    for name in method_names():
        t = traits(name)
        for mode in ("measure", "train"):
            prepared = prepare(tiny_llama(layers=L), TrainConfig(method=name, gamma=2, probe_steps=1, lora_r=R,
                                                                 probe_mode=mode))
            assert (prepared.sampler.kind if prepared.sampler else None) == t.sampling, name
            assert prepared.offload == t.offload, name
            # a measuring method has a probe (steps before the first importance draw) in either probe mode
            assert t.measures == (prepared.sampler is not None and prepared.sampler.start > 0), (name, mode)
            if mode == "measure":  # the paper's probe: steps that update nothing
                assert t.measures == (prepared.sampler is not None and prepared.sampler.measure_steps > 0), name
    with pytest.raises(ValueError, match="has no row in grass_ft.registry.METHODS"):
        register_method("no-such-method")
