"""Every decoder family the block-list table of models.py names, as a tiny random model: block discovery, every
parameter assigned once (tied heads once), and GRASS steps that move exactly the drawn block."""

import pytest
import torch

from grass_ft.config import TrainConfig
from grass_ft.method.methods import prepare
from grass_ft.model import block_layout
from grass_ft.method.step import StepRunner
from test_step import batches

V, H, L = 103, 32, 3
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=4,
              max_position_embeddings=64)


def family_configs():
    import transformers as tf

    return {
        "llama": tf.LlamaConfig(**COMMON, num_key_value_heads=2),
        "qwen2": tf.Qwen2Config(**COMMON, num_key_value_heads=2),
        "mistral": tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
        "gemma": tf.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=8),  # tied embeddings by default
        "phi": tf.PhiConfig(**COMMON),
        "gpt2": tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64),  # tied
        "gptj": tf.GPTJConfig(vocab_size=V, n_embd=H, n_layer=L, n_head=4, rotary_dim=4, n_positions=64),
        "falcon": tf.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4),
        "gpt_neox": tf.GPTNeoXConfig(**COMMON, rotary_pct=0.25),
        "opt": tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=2 * H,
                            max_position_embeddings=64, word_embed_proj_dim=H),
    }


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi", "gpt2", "gptj", "falcon", "gpt_neox", "opt"]
TIED = {"gemma", "gpt2", "falcon", "opt"}  # these configs tie the LM head to the input embeddings by default


def build(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = family_configs()[name]
    cfg._attn_implementation = "eager"
    cfg.bos_token_id = cfg.eos_token_id = 0  # inside the tiny vocabulary
    return AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_blocks_heads_and_grass_steps(name):
    model = build(name)
    layout = block_layout(model)
    assert layout.num_blocks == L
    named = dict(model.named_parameters())  # a tied head is yielded once
    assigned = [n for b in layout.blocks for n in b] + layout.embeddings + layout.head + layout.other
    assert sorted(assigned) == sorted(named)  # every parameter exactly once
    assert all(layout.blocks) and layout.embeddings and layout.head
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    tied = out is emb
    assert tied == (name in TIED)  # both kinds are covered
    assert not layout.other, layout.other  # nothing the sampler would leave untracked
    head_names = {n for n, p in named.items() if p is out}
    assert head_names <= set(layout.embeddings if tied else layout.head)

    cfg = TrainConfig(method="grass", gamma=1, probe_steps=1, sample_interval=2, update_interval=2, lr=1e-2,
                      max_steps=5, offload=True, probe_mode="measure")  # the paper's probe: step 0 updates nothing
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared, max_grad_norm=1.0)
    data = batches(5, seq=10)
    for t, mbs in enumerate(data):
        before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
        res = runner.train_step(t, mbs)
        assert torch.isfinite(torch.tensor(res.loss))
        moved = {n for n, p in prepared.model.named_parameters() if not torch.equal(before[n], p.detach())}
        if t == 0:
            assert moved == set() and res.probe  # the probe reads gradients, updates nothing
        else:
            assert len(res.active) == 1
            block = set(layout.blocks[res.active[0]])
            # the drawn block and the embeddings/final norm/head (trained at every step by default), nothing else
            assert moved & block and moved <= block | set(prepared.always)
            assert set(prepared.always) <= moved and prepared.always


@pytest.mark.parametrize("name", FAMILIES)
def test_family_supervised_only_loss(name):
    """The native loop's default loss path on each family: a family whose head was checked (``loss.HEADS``) gets
    the chunked supervised-only loss, equal to ``model(**batch).loss`` in value and every gradient; any other
    falls back to the full forward with a warning naming the model type (never silently)."""
    import warnings

    from grass_ft.method import loss as loss_mod
    from grass_ft.method.loss import HEADS, supervised_loss

    model = build(name).eval()  # no dropout (GPT-2, OPT): the two forwards must see the same function
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[1, 9:] = -100  # and padding-like tail
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    warned = set(loss_mod._warned)  # each fallback reason is warned once per process: see it afresh, then restore
    loss_mod._warned.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = supervised_loss(model, batch)
    finally:
        loss_mod._warned.clear()
        loss_mod._warned.update(warned)
    fell_back = [w for w in caught if "falls back to the full forward" in str(w.message)]
    assert bool(fell_back) == (model.config.model_type not in HEADS), [str(w.message) for w in caught]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    # the same per-position fp32 work summed in another order (chunks of supervised positions vs all positions):
    # a sum of n <= 24 position terms reordered moves by <= n u ~ 1.4e-6 of the terms' magnitude (u = 2**-24);
    # the loss (~4.6, terms of one sign) gets rtol 1e-5. A weight's gradient is such a sum over positions fed
    # back through <= 4 blocks of ~4 matmuls each (K <= 64): first order, 24 u + 16 x 64 u ~ 6e-5 of the terms'
    # magnitude, hence rtol 1e-4; atol 1e-6 for elements whose terms cancel (terms <= ~1e-2 here, x 6e-5 ~ 6e-7)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (n, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), n
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=n)
