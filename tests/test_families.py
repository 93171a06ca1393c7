"""Every decoder family the block-list table of models.py names, as a tiny random model: block discovery, every
parameter assigned once (tied heads once), and GRASS steps that move exactly the drawn block."""

import pytest
import torch

from grass_ft.config import TrainConfig
from grass_ft.methods import prepare
from grass_ft.models import block_layout
from grass_ft.step import StepRunner
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
                      max_steps=5, offload=True)
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
            assert moved and moved <= set(layout.blocks[res.active[0]])  # only the drawn block
