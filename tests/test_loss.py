"""Supervised-only loss (grass_ft.loss): the same loss and gradients as ``model(**batch).loss`` on tiny models,
tied and untied heads, peft LoRA, a softcapped Gemma-2 head; the empty-batch rule; the fallback; GRASS's
backward stop; FakeTensorMode; the native loop; and transformers' Trainer.

Tolerances: both computations do the same fp32 operations per position (head matmul, log-softmax, the label's
term); what differs is the order of the sums — the loss is a sum over chunks of partial sums instead of one
reduction over all positions, and the head's weight gradient is a matmul over the supervised rows only instead of
all rows (the others contribute exact zeros). Reordering a sum of n fp32 terms changes it by at most about
n * 2**-24 of the terms' magnitude; with n <= 100 here that is < 1e-5 relative (RTOL), and ATOL covers entries
that are sums of cancelling terms near zero (terms ~1e-1, so ~1e-7 absolute; 1e-6 leaves margin).
"""

import copy
import math
import warnings

import pytest
import torch

from grass_ft import data as data_mod
from grass_ft.config import TrainConfig
from grass_ft.method.loss import (IGNORE_INDEX, chunk_positions, enable_supervised_loss, head_path, supervised_loss)
from grass_ft.method.methods import prepare
from grass_ft.method.step import StepRunner
from tiny import char_tokenizer, tiny_llama

RTOL, ATOL = 1e-5, 1e-6
# a silent fallback to the full forward would make every comparison below trivially pass
pytestmark = pytest.mark.filterwarnings("error:supervised-only loss falls back")


def batch(vocab=103, seed=0, empty_row=True):
    """Three rows: right padding in two, a masked prompt in all, and (``empty_row``) one row with no target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # the prompt
    labels[mask == 0] = IGNORE_INDEX  # the padding
    if empty_row:
        labels[2] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_same(full_model, ours_model, b, chunk_size=None, **kw):
    full = full_model(**b, **kw).loss
    full.backward()
    ours = supervised_loss(ours_model, b, chunk_size=chunk_size, **kw)
    ours.backward()
    torch.testing.assert_close(ours, full, rtol=RTOL, atol=ATOL)
    theirs = dict(full_model.named_parameters())
    checked = 0
    for n, p in ours_model.named_parameters():
        if theirs[n].grad is None:
            assert p.grad is None, n
            continue
        torch.testing.assert_close(p.grad, theirs[n].grad, rtol=RTOL, atol=ATOL, msg=n)
        checked += 1
    assert checked > 0
    return ours


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_size", [5, None])  # 5: several chunks and a ragged last one; None: the default
def test_same_loss_and_gradients_as_the_full_forward(tie, chunk_size):
    model = tiny_llama(tie=tie)
    assert head_path(model)[0] is not None
    assert_same(model, copy.deepcopy(model), batch(), chunk_size=chunk_size)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model = tiny_llama()
    b = batch()
    n = torch.tensor(50)  # e.g. the count over all accumulated micro-batches
    assert_same(model, copy.deepcopy(model), b, chunk_size=4, num_items_in_batch=n)


def test_a_batch_with_no_supervised_token_gives_zero_loss_and_zero_gradients():
    model = tiny_llama()
    b = batch()
    b["labels"][:] = IGNORE_INDEX
    assert torch.isnan(copy.deepcopy(model)(**b).loss)  # transformers: 0 / 0
    loss = supervised_loss(model, b)
    loss.backward()
    assert loss.item() == 0.0
    for n, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), n


def test_peft_lora_including_an_adapter_on_the_head():
    peft = pytest.importorskip("peft")
    for targets in (["q_proj", "v_proj"], ["q_proj", "lm_head"]):
        base = tiny_llama()
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        model = peft.get_peft_model(base, cfg)
        path, why = head_path(model)
        assert path is not None, why
        assert ("lm_head" in targets) == (type(path.head) is not torch.nn.Linear)  # the adapter'd head is used
        assert_same(model, copy.deepcopy(model), batch(), chunk_size=6)


def test_gemma2_final_logit_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                       attn_implementation="eager", pad_token_id=1)
    model = Gemma2ForCausalLM(cfg).float()
    path, _ = head_path(model)
    assert path.kind == "softcap" and path.factor == 0.5  # a cap this small changes the loss a lot if skipped
    assert_same(model, copy.deepcopy(model), batch(vocab=97), chunk_size=8)


def test_unknown_architectures_fall_back_to_the_full_forward_with_a_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=103, n_embd=32, n_layer=2, n_head=4)).float().eval()  # no dropout
    assert "gpt2" in head_path(model)[1]
    b = batch()
    with pytest.warns(UserWarning, match="falls back to the full forward: model type 'gpt2'"):
        ours = supervised_loss(model, b)
    assert torch.equal(ours, model(**b).loss)  # the very same computation


def test_frozen_lower_blocks_get_no_backward():
    """GRASS: embeddings and blocks 0-1 frozen, so autograd must not reach below block 2 (no input grads)."""
    model = tiny_llama()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("model.layers.2.", "model.layers.3.")))
    needs_grad = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad
                                                                                  if isinstance(out, tuple)
                                                                                  else out.requires_grad))
    supervised_loss(model, batch(), chunk_size=7).backward()
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_with_activation_checkpointing_and_frozen_lower_blocks():
    """The native loop's gradient_checkpointing (non-reentrant, input-require-grads hook removed) under GRASS."""
    from grass_ft.model import enable_checkpointing

    model = tiny_llama()
    enable_checkpointing(model)
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.2."))
    assert_same(model, copy.deepcopy(model), batch(), chunk_size=9)


def test_runs_under_fake_tensor_mode_with_memtracker():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with FakeTensorMode():
        model = LlamaForCausalLM(cfg)
        b = batch(vocab=4096)
        supervised_loss(model, b).backward()  # warm-up, as MemTracker wants
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:  # the head is applied once per chunk and again in backward: MemTracker must accept that
            loss = supervised_loss(model, b, chunk_size=16)
            loss.backward()
        assert loss.shape == () and model.lm_head.weight.grad is not None
    assert chunk_positions(4096) == 2048


# ------------------------------------------------------------------------------------------- native loop


def _batches(steps, empty_at=None):
    tok = char_tokenizer()
    exs = [{"instruction": f"{a}+{b}=", "input": "", "output": f"The answer is {a + b}", "answer": str(a + b)}
           for a in range(10) for b in range(10)]
    feats = [data_mod.tokenize_example(tok, ex, 256) for ex in exs]
    out = []
    for t in range(steps):
        mb = data_mod.collate(feats[4 * t:4 * t + 4], tok.pad_token_id)
        if t == empty_at:
            mb["labels"][:] = IGNORE_INDEX
        out.append([mb])
    return out, len(tok)


def _grads_at_step(runner: StepRunner) -> dict:
    """Captures the gradients the optimizer is about to apply (after clipping), keyed by parameter name."""
    grads: dict[str, torch.Tensor] = {}

    def capture(_opt, _args, _kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in runner.params.items() if p.grad is not None})

    return grads, runner.p.optimizer.register_step_pre_hook(capture)


@pytest.mark.parametrize("method", ["grass", "lora", "dora"])
def test_native_loop_trains_the_same_with_either_forward(method):
    """StepRunner with the full forward and with ``supervised_loss``, in lockstep: at every step both start from
    the same weights, and the losses, skip decisions, active blocks and the (clipped) gradients each optimizer is
    about to apply are compared.

    Why lockstep and not the weights after five steps: the two gradients differ by fp32 rounding only (the module
    docstring's bound, RTOL/ATOL), but Adam divides m by sqrt(v) + eps, so an element whose gradient is a
    cancellation (true value ~0, rounding noise ~1e-8 ~ eps) is turned into an update of up to ~3 lr whatever the
    noise's sign, and later steps feed those weight differences back into every gradient. No bound on the weights
    after several steps follows from the arithmetic (issue 28: 1.98e-5 on one AVX-512 CPU, under 1e-5 on others),
    while the gradients at equal weights obey the summation bound on every CPU. The optimizer's own arithmetic is
    tested against torch.optim.AdamW elsewhere (test_offload, test_precision).
    """
    data, vocab = _batches(5, empty_at=3)

    def runner():
        cfg = TrainConfig(method=method, gamma=2, probe_steps=1, sample_interval=2, lr=1e-2, max_steps=5,
                          offload=False, lora_dropout=0.0, seed=3)
        return StepRunner(prepare(tiny_llama(vocab), cfg), max_grad_norm=1.0)

    full, ours = runner(), runner()
    compared = 0
    for t, mbs in enumerate(data):
        with torch.no_grad():  # the same weights at the start of every step (the previous step's updates differ)
            for n, p in ours.params.items():
                p.copy_(full.params[n])
        (g_full, h_full), (g_ours, h_ours) = _grads_at_step(full), _grads_at_step(ours)
        a = full.train_step(t, mbs)
        b = ours.train_step(t, mbs, forward=supervised_loss)
        h_full.remove(), h_ours.remove()
        assert (a.skipped, a.probe, a.active) == (b.skipped, b.probe, b.active), t
        if t == 3:  # no supervised token: skipped by both (NaN from the full forward, 0 from ours)
            assert a.skipped and b.loss == 0.0 and not g_full and not g_ours
            continue
        assert not a.skipped and a.loss == pytest.approx(b.loss, rel=RTOL)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=RTOL)
        assert g_ours.keys() == g_full.keys() and g_ours, t
        for n, g in g_full.items():
            torch.testing.assert_close(g_ours[n], g, rtol=RTOL, atol=ATOL, msg=f"step {t}: {n}")
        compared += 1
    assert compared == 4  # every step but the empty one updates (grass's default probe trains, probe_mode=train)


# ----------------------------------------------------------------------------------------------- Trainer


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_with_enable_supervised_loss(tmp_path, accum, monkeypatch):
    from transformers import Trainer, TrainingArguments

    import grass_ft.method.loss as loss_mod

    calls = []
    head_loss = loss_mod.head_loss
    monkeypatch.setattr(loss_mod, "head_loss", lambda *a, **kw: calls.append(kw["num_items_in_batch"])
                        or head_loss(*a, **kw))

    data, vocab = _batches(8)
    rows = [{k: v[i].tolist() for k, v in mbs[0].items()} for mbs in data for i in range(4)]

    def collator(features):
        return {k: torch.tensor([f[k] for f in features]) for k in features[0]}

    models = {}
    for patched in (False, True):
        model = tiny_llama(vocab)
        if patched:
            enable_supervised_loss(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), max_steps=4, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=accum, learning_rate=1e-2, report_to=[], logging_steps=1,
                                 optim="sgd", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                 train_sampling_strategy="sequential", eval_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], data_collator=collator)
        trainer.train()
        models[patched] = (model, [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer)
    (full, full_log, _), (ours, ours_log, trainer) = models[False], models[True]
    assert len(calls) == 4 * accum and all(n is not None for n in calls)  # the Trainer's token count reached us
    # Plain SGD (optim="sgd"), not AdamW: Adam normalises a cancelling gradient element's rounding noise into an
    # update of ~lr whatever its sign (see the native-loop test), SGD moves each weight by lr x its gradient, so the
    # two runs' weights differ by at most sum_t lr (RTOL |g| + ATOL) (1 + lr ||H||)^t ~ 4 x 1e-2 x (RTOL |g| + ATOL)
    # after 4 steps: far inside RTOL/ATOL themselves. The logged losses differ by the reorder bound (RTOL) plus
    # ||grad L|| ||dw|| <~ 5 x sqrt(3e4 params) x 4e-8 ~ 4e-5 absolute on a loss ~4.6, i.e. ~1e-5 relative: 1e-4.
    # A wrong scale of our loss (the Trainer's token count ignored, accumulation divided twice) moves the weights
    # by ~lr |g| ~ 1e-4 and the loss by far more than that.
    assert len(ours_log) == 4 and ours_log == pytest.approx(full_log, rel=1e-4)
    moved, start = 0, tiny_llama(vocab)
    for (n, p), (_, q) in zip(full.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL, msg=n)
        moved += not torch.equal(p, start.get_parameter(n))
    assert moved > 0  # training moved the weights (a comparison of two untouched models would pass trivially)
    # evaluation and prediction still get logits: the patch acts only in training mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = trainer.predict(rows[:4])
    assert pred.predictions.shape[-1] == vocab and "test_loss" in pred.metrics


def test_sft_trainer_keeps_its_own_fused_head_with_the_patch(tmp_path):
    """TRL's SFTTrainer calls the model with ``fused_lm_head=True``; the patch must step aside for that call."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = char_tokenizer()
    ds = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(4)])
    model = enable_supervised_loss(tiny_llama(len(tok)))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                         max_length=64, gradient_checkpointing=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_grass_callback_points_to_enable_supervised_loss():
    from grass_ft.config import ConfigError
    from grass_ft.frontends.hf import GrassCallback

    with pytest.raises(ConfigError, match=r"`supervised_only_loss` is not a GrassCallback key: set it with "
                                          r"grass_ft\.loss\.enable_supervised_loss\(model\)"):
        GrassCallback(supervised_only_loss=True)
