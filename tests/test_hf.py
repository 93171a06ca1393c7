"""GrassCallback under a real transformers.Trainer (and TRL's SFTTrainer) on a tiny Llama: the probe moves nothing,
exactly the drawn blocks move, frozen parts stay put, checkpointing, state off the device, resume, and the same
weights and draws as the native StepRunner loop."""

import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from grass_ft import data as data_mod
from grass_ft.config import ConfigError, TrainConfig
from grass_ft.frontends.hf import GrassCallback
from grass_ft.method.methods import prepare
from grass_ft.method.step import StepRunner
from tiny import char_tokenizer, tiny_llama

L = 4
TOK = char_tokenizer()
EMB = {"model.embed_tokens.weight"}
HEAD = {"model.norm.weight", "lm_head.weight"}
FROZEN = {"train_embeddings": False, "train_head": False}  # the paper's layout (the default trains both)
MEASURE = {"probe_mode": "measure"}  # the paper's probe: reads every block, updates nothing (the default trains)


def examples():
    # a, b in 5..9: every sum has two digits, so every example has the same number of tokens and target tokens
    # (the Trainer's token-weighted loss then equals the native loop's mean of micro-batch means)
    return [{"instruction": f"{a}+{b}=", "input": "", "output": f"The answer is {a + b}", "answer": str(a + b)}
            for a in range(5, 10) for b in range(5, 10)]


FEATURES = [data_mod.tokenize_example(TOK, ex, 256) for ex in examples()]


class Features(torch.utils.data.Dataset):
    def __len__(self):
        return len(FEATURES)

    def __getitem__(self, i):
        return FEATURES[i]


def collator(features):
    return data_mod.collate(features, TOK.pad_token_id)


def training_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def checkpointing_args():
    fields = TrainingArguments.__dataclass_fields__
    if "activation_checkpointing" in fields:  # transformers >= 5 name; gradient_checkpointing is its alias
        return {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


class StepLog(TrainerCallback):
    """Names of the parameters each step changed, and the callback's memory report after each step."""

    def __init__(self, grass=None, stop_at=None):
        self.grass, self.stop_at = grass, stop_at
        self.moved, self.reports, self._before = {}, {}, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step - 1
        self.moved[step] = {n for n, p in model.named_parameters() if not torch.equal(self._before[n], p.detach())}
        if self.grass is not None:
            self.reports[step] = self.grass.memory_report()
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True


def run(out, grass, model=None, log=None, **kw):
    model = model if model is not None else tiny_llama(len(TOK), layers=L)
    log = log or StepLog(grass)
    trainer = Trainer(model=model, args=training_args(out, **kw), train_dataset=Features(), data_collator=collator,
                      callbacks=[grass, log])
    trainer.train()
    return model, trainer, log


def read_trace(out):
    return [json.loads(line) for line in (Path(out) / "layers.jsonl").read_text().splitlines()]


def active_by_step(trace, steps):
    """The active blocks at each step (None in the probe) as the trace's draw events say."""
    draws = {ev["step"]: ev["active"] for ev in trace if ev["event"] == "draw"}
    active, out = None, {}
    for t in range(steps):
        active = draws.get(t, active)
        out[t] = active
    return out


def block_names(model, blocks):
    return {n for n, _ in model.named_parameters() for b in blocks if n.startswith(f"model.layers.{b}.")}


# ---------------------------------------------------------------------------------------------- config


def test_keys_are_validated_through_the_config_all_at_once():
    with pytest.raises(ConfigError) as e:
        GrassCallback(method="fft", gama=2, tau=-1.0, lr=1e-3, gamma="two")
    msg = str(e.value)
    for part in ("`method` must be one of grass, grass-static, lisa", "unknown key `gama` (did you mean `gamma`?)",
                 "`tau` must be > 0", "`lr` is not a GrassCallback key: set it with TrainingArguments(learning_rate",
                 "`gamma` must be an integer, got 'two'"):
        assert part in msg
    cb = GrassCallback(method="lisa", gamma="2", train_head="false")  # values coerced as from the CLI
    assert (cb.config.gamma, cb.config.train_head) == (2, False)


def test_the_callbacks_default_method_is_the_best_sampling_arm_not_the_clis():
    from grass_ft.config import TrainConfig
    from grass_ft.base.registry import DEFAULT_SAMPLING, traits

    assert not traits(TrainConfig().method).sampling  # `grass-ft train`'s default samples no layers (fft)
    assert GrassCallback().config.method == DEFAULT_SAMPLING == "grass-uniform"
    assert traits(DEFAULT_SAMPLING).sampling == "uniform"


def test_gamma_and_probe_are_checked_against_the_model_and_the_trainer(tmp_path):
    with pytest.raises(ConfigError, match=r"`gamma` must be between 1 and 4 \(the model has 4 decoder blocks\)"):
        Trainer(model=tiny_llama(len(TOK), layers=L), args=training_args(tmp_path), train_dataset=Features(),
                data_collator=collator, callbacks=[GrassCallback(gamma=5)])
    with pytest.raises(ConfigError, match=r"`probe_steps` must be below the Trainer's max_steps=3"):
        run(tmp_path, GrassCallback(method="grass", gamma=1, probe_steps=3, **MEASURE), max_steps=3)


def test_untested_setups_are_refused_before_a_step(tmp_path):
    model = tiny_llama(len(TOK), layers=L)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"GrassCallback does not support fp16 mixed precision \(use bf16=True"):
        run(tmp_path, GrassCallback(gamma=1), model=model, fp16=True)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_optimizer_built_from_frozen_params_is_refused(tmp_path):
    # LMFlow #726: freezing before the Trainer builds its optimizer leaves sampled blocks out of it
    model = tiny_llama(len(TOK), layers=L)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"does not cover 9 parameter\(s\) .*model\.layers\.1\..*LMFlow #726"):
        run(tmp_path, GrassCallback(gamma=1), model=model)


# ------------------------------------------------------------------------------------------- training


def test_probe_updates_nothing_not_even_weight_decay(tmp_path):
    model = tiny_llama(len(TOK), layers=L)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grass = GrassCallback(method="grass", gamma=2, probe_steps=5, **MEASURE)
    _, trainer, _ = run(tmp_path, grass, model=model, log=StepLog(grass, stop_at=5), max_steps=8,
                        weight_decay=0.1, gradient_accumulation_steps=2)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(trainer.optimizer.state) == 0  # AdamW never touched a parameter: no moment, no decay
    assert grass.runner.sampler.window.count.tolist() == [10] * L  # every block, once per micro-batch
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored at on_train_end
    assert not (tmp_path / "layers.jsonl").read_text()  # no draw yet


@pytest.mark.parametrize("keys,ckpt,trained_always", [
    # the default layout: embeddings, final norm and head at every step
    ({"method": "grass", **MEASURE}, False, EMB | HEAD),
    ({"method": "grass", **MEASURE}, True, EMB | HEAD),
    ({"method": "grass", **FROZEN, **MEASURE}, False, set()),
    ({"method": "grass", **FROZEN, **MEASURE}, True, set()),
    ({"method": "grass-static", "train_embeddings": True, "train_head": False, **MEASURE}, False, EMB),
    ({"method": "grass", "train_embeddings": False, "train_head": True, "reset_state_on_switch": True, **MEASURE},
     False, HEAD),
    ({"method": "lisa"}, True, EMB | HEAD),
])
def test_exactly_the_drawn_blocks_move(tmp_path, keys, ckpt, trained_always):
    grass = GrassCallback(gamma=1, probe_steps=2, sample_interval=2, update_interval=2, tau=10.0, seed=3, **keys)
    model, _, log = run(tmp_path, grass, max_steps=12, max_grad_norm=1.0, **(checkpointing_args() if ckpt else {}))
    trace = read_trace(tmp_path)
    probe = 0 if keys["method"] == "lisa" else 2
    assert [ev["step"] for ev in trace if ev["event"] == "draw"] == list(range(probe, 12, 2))
    drawn = set()
    for t, active in active_by_step(trace, 12).items():
        if t < probe:
            assert active is None and log.moved[t] == set(), t
            continue
        assert log.moved[t] == block_names(model, active) | trained_always, f"step {t}: active {active}"
        drawn |= set(active)
    assert len(drawn) >= 3  # the active set changed, and each newly drawn block moved
    assert all(p.requires_grad for p in model.parameters())


def test_checkpointing_with_the_lowest_blocks_frozen(tmp_path, monkeypatch):
    import grass_ft.method.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "draw", lambda logp, k, g: [2])  # blocks 0 and 1 stay frozen
    grass = GrassCallback(method="grass", gamma=1, probe_steps=2, sample_interval=100, **FROZEN, **MEASURE)
    model = tiny_llama(len(TOK), layers=L)
    needs_grad = []  # whether block 1's output requires grad, i.e. whether backward runs below block 2
    model.model.layers[1].register_forward_hook(lambda m, i, o: needs_grad.append(
        (o[0] if isinstance(o, tuple) else o).requires_grad))
    model, _, log = run(tmp_path, grass, model=model, max_steps=5, **checkpointing_args())
    assert set().union(*log.moved.values()) == block_names(model, [2])
    assert needs_grad[:2] == [True, True] and not any(needs_grad[2:])  # probe, then backward stops at block 2
    assert grass.runner.sampler.mgn.gt(0).all()  # the probe measured every block under checkpointing
    assert grass.runner.sampler.window.count.tolist() == [0, 0, 3, 0]  # then only the trained block


@pytest.mark.parametrize("reset", [False, True])
def test_state_of_blocks_out_of_the_active_set_is_off_the_device(tmp_path, reset):
    grass = GrassCallback(gamma=1, probe_steps=1, sample_interval=1, tau=10.0, reset_state_on_switch=reset, **FROZEN)
    model, trainer, log = run(tmp_path, grass, max_steps=10)
    params = dict(model.named_parameters())
    block_bytes = sum(params[n].numel() for n in block_names(model, [0])) * 2 * 4  # exp_avg + exp_avg_sq, fp32
    active = active_by_step(read_trace(tmp_path), 10)
    for t in range(1, 10):
        # one block's moments on the device after every step, however many blocks have been drawn so far
        assert log.reports[t]["device_state_bytes"] == block_bytes, t
        seen = {b for s in range(1, t + 1) for b in active[s]}
        assert log.reports[t]["host_state_bytes"] == (0 if reset else (len(seen) - len(active[t])) * block_bytes)
    # the bookkeeping matches the optimizer: every parameter with state outside the active block is offloaded
    with_state = {p for p, s in trainer.optimizer.state.items() if s}
    offloaded = grass._mover.offloaded
    assert {params[n] for n in block_names(model, active[9])} == with_state - offloaded
    assert all(s["exp_avg"].device.type == "cpu" for p, s in trainer.optimizer.state.items() if p in offloaded)
    assert log.reports[9]["peak_device_state_bytes"] == block_bytes


def test_badam_order_through_the_trainer_restarts_a_blocks_moments_when_it_comes_round_again(tmp_path):
    grass = GrassCallback(method="badam", gamma=2, sample_interval=2, **FROZEN)
    model, trainer, log = run(tmp_path, grass, max_steps=8)
    active = active_by_step(read_trace(tmp_path), 8)
    assert [active[t] for t in range(0, 8, 2)] == [[0, 1], [2, 3], [0, 1], [2, 3]]  # in order, no probe
    for t in range(8):
        assert log.moved[t] == block_names(model, active[t]), t
    # blocks 2 and 3 came round again at step 6: their Adam moments restarted there, so 2 steps, not 4
    params = dict(model.named_parameters())
    steps = {n: int(trainer.optimizer.state[params[n]]["step"]) for n in block_names(model, [2, 3])}
    assert set(steps.values()) == {2}, steps
    assert all(not trainer.optimizer.state.get(params[n]) for n in block_names(model, [0, 1]))  # left: dropped


def test_with_the_offloading_optimizer_as_the_trainers(tmp_path):
    from grass_ft.method.offload import LayerwiseOffloadAdamW

    model = tiny_llama(len(TOK), layers=L)
    grass = GrassCallback(gamma=1, probe_steps=1, sample_interval=2, tau=10.0, **FROZEN)
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    log = StepLog(grass)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=Features(),
                      data_collator=collator, callbacks=[grass, log], optimizers=(opt, None))
    trainer.train()
    for t, active in active_by_step(read_trace(tmp_path), 6).items():
        assert log.moved[t] == (block_names(model, active) if active is not None else set())
    report = grass.memory_report()
    assert report["device_state_bytes"] == 0 and report["host_state_bytes"] > 0


# ---------------------------------------------------------------------------------- one step, two loops


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_and_native_loop_give_the_same_draws_and_weights(tmp_path, accum):
    keys = dict(method="grass", gamma=2, probe_steps=2, sample_interval=2, update_interval=2, tau=0.5, seed=5)
    steps, clip = (8 if accum == 1 else 6), 0.05  # within the first epoch; this clip acts at every step, so MGN
    # must be read before clipping for the two loops to agree
    grass = GrassCallback(**keys)
    model, _, _ = run(tmp_path, grass, max_steps=steps, gradient_accumulation_steps=accum, max_grad_norm=clip,
                      optim="sgd", lr_scheduler_type="constant", train_sampling_strategy="sequential")

    native = tiny_llama(len(TOK), layers=L)
    cfg = TrainConfig(**keys, lr=1e-2, max_steps=steps, grad_accum=accum, max_grad_norm=clip, offload=False)
    prepared = prepare(native, cfg)
    covered = [p for g in prepared.optimizer.param_groups for p in g["params"]]
    assert len(covered) == len(list(native.parameters()))
    prepared.optimizer = torch.optim.SGD(covered, lr=1e-2)  # as the Trainer's optim="sgd" (see below)
    runner = StepRunner(prepared, grad_accum=accum, max_grad_norm=clip)
    events, i = [], 0
    for t in range(steps):
        mbs = []
        for _ in range(accum):
            mbs.append(collator(FEATURES[i:i + 2]))
            i += 2
        events += runner.train_step(t, mbs).events

    # Plain SGD in both loops (issue 28): the two compute the loss with another rounding (the Trainer scales by
    # its token count, the native loop takes the mean of micro-batch means: a few ulps, u = 2**-24, of each
    # gradient element), and AdamW would turn such noise on a cancelling element into an update of ~lr whatever
    # its sign (test_loss explains it), leaving the weights after 8 steps without a bound. SGD moves each weight
    # by lr x its (clipped, |g| <= clip = 0.05) gradient, so after T steps the weights differ by at most
    # sum_t lr (4u |g|) (1 + lr ||H||)^t ~ 8 x 1e-2 x 4 x 6e-8 x 0.05 ~ 1e-9: far inside assert_close's float32
    # atol (1e-5), as the MGN readings (gradient RMS ~1e-2, differing by the same relative few u plus
    # ||H|| x 1e-9). A draw flips only if a uniform sample falls within ~1e-7 of a boundary of the cumulative
    # probabilities: p ~ 1e-7 per draw. What the test guards -- a step the callback takes at another time, a
    # block frozen or measured at the wrong step, MGN read after clipping -- moves a weight by ~lr |g|, 1e-4.
    trace = read_trace(tmp_path)
    assert [(e["step"], e["event"], e["active"]) for e in trace] == [(e["step"], e["event"], e["active"])
                                                                      for e in events]
    for ours, theirs in zip(trace, events):
        torch.testing.assert_close(torch.tensor(ours["mgn"]), torch.tensor(theirs["mgn"]))
    moved = 0
    for (n, p), (_, q) in zip(model.named_parameters(), native.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
        moved += not torch.equal(p, tiny_llama(len(TOK), layers=L).get_parameter(n))
    assert moved > 0


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_continues_as_one_uninterrupted_run(tmp_path, restore_callbacks):
    keys = dict(method="grass", gamma=1, probe_steps=2, sample_interval=2, update_interval=4, tau=10.0, seed=1)
    ckpt = dict(max_steps=12, save_strategy="steps", save_steps=6)
    full, _, _ = run(tmp_path / "full", GrassCallback(**keys), **ckpt)

    grass = GrassCallback(**keys)
    run(tmp_path / "cut", grass, log=StepLog(stop_at=6), **ckpt)
    checkpoint = tmp_path / "cut" / "checkpoint-6"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GrassCallback"]
    assert saved["grass"]["next_step"] == 6
    assert grass._mover.offloaded  # some state was off the device when optimizer.pt was written

    # a fresh process: new model (other init), new callback, resumed from the checkpoint
    resumed = tiny_llama(len(TOK), layers=L, seed=1)
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "cut", restore_callback_states_from_checkpoint=
                                                        restore_callbacks, **ckpt),
                      train_dataset=Features(), data_collator=collator, callbacks=[GrassCallback(**keys)])
    trainer.train(resume_from_checkpoint=str(checkpoint))

    trace_full, trace_cut = read_trace(tmp_path / "full"), read_trace(tmp_path / "cut")
    assert trace_cut == trace_full
    active = active_by_step(trace_full, 12)
    # the run is only a test of the restored moments if a block trained before the cut trains again after it
    assert {b for t in range(2, 6) for b in active[t]} & {b for t in range(6, 12) for b in active[t]}
    # the same Trainer, kernels, batches and summation order after the cut as in the uninterrupted run, and the
    # optimizer state restored exactly: the same floats, not merely close (the weights after several AdamW steps
    # have no tolerance bound, see above, so exactness is what is asserted)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, msg=n, rtol=0, atol=0)


def test_resume_from_a_checkpoint_without_grass_state_is_refused(tmp_path):
    model = tiny_llama(len(TOK), layers=L)
    Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=Features(), data_collator=collator).train()
    with pytest.raises(ValueError, match="resuming at step 2, but the checkpoint has no GrassCallback state"):
        Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=Features(),
                data_collator=collator, callbacks=[GrassCallback(gamma=1, probe_steps=1)]
                ).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ------------------------------------------------------------------------------------------------- TRL


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig's default
def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(5) for b in range(5)])
    model = tiny_llama(len(TOK), layers=L)
    grass = GrassCallback(method="grass", gamma=1, probe_steps=2, sample_interval=2, tau=10.0)
    log = StepLog(grass)
    always = EMB | HEAD  # the default layout
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                         max_length=64)
    trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=TOK, callbacks=[grass, log]).train()
    for t, active in active_by_step(read_trace(tmp_path), 6).items():
        assert log.moved[t] == (block_names(model, active) | always if active is not None else set()), t
