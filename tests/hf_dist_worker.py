"""One Trainer run for tests/test_hf_distributed.py, started by torchrun (or as a plain process for the reference).

    python -m torch.distributed.run --nproc_per_node=2 tests/hf_dist_worker.py OUT grass batch=2
    python tests/hf_dist_worker.py OUT grass batch=4                      # one process
    ... OUT grass batch=2 accum=2 save_steps=3 resume=CHECKPOINT          # accumulation, checkpoints, resume
    ... OUT grass batch=2 optim=sgd                                       # the Trainer's optimizer (adamw_torch)

``grass``: GrassTrainer + GrassCallback. ``ddp``: the plain Trainer, DDP with ``find_unused_parameters=True``, and a
callback that freezes all but block 0 at every step (a layer-sampled run as LISA users run it under DDP), with a
DDP communication hook that counts the bytes DDP all-reduces. Rank 0 writes the weights and the Trainer's log; every
rank writes the bytes it all-reduced per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))

from grass_ft import data as data_mod  # noqa: E402
from grass_ft.frontends.hf import GrassCallback, GrassTrainer  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

TOK = char_tokenizer()
# the paper's method and probe (2 steps that read every block and update nothing): the tests count them
KEYS = dict(method="grass", gamma=2, probe_steps=2, sample_interval=2, update_interval=2, tau=0.5, seed=5,
            probe_mode="measure")
MAX_STEPS = 6  # 4 examples a step, 25 examples: within the first epoch


def features():
    # a, b in 5..9: every example has the same number of tokens and target tokens, so the token-weighted loss of
    # a global batch equals the mean of the ranks' shares
    exs = [{"instruction": f"{a}+{b}=", "input": "", "output": f"The answer is {a + b}", "answer": str(a + b)}
           for a in range(5, 10) for b in range(5, 10)]
    return [data_mod.tokenize_example(TOK, ex, 256) for ex in exs]


class Features(torch.utils.data.Dataset):
    def __init__(self):
        self.items = features()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class FreezeAllButBlock0(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        for i, layer in enumerate(model.model.layers):
            layer.requires_grad_(i == 0)


class CountingTrainer(Trainer):
    """The plain Trainer; counts the bytes DDP all-reduces per step through a communication hook."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bytes_now, self.per_step, self._hooked = 0, {}, False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._hooked:
            assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)

            def hook(state, bucket):
                self.bytes_now += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(None, bucket)

            model.register_comm_hook(None, hook)
            self._hooked = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.per_step[self.state.global_step], self.bytes_now = self.bytes_now, 0
        return loss


def main(out: Path, mode: str, batch: int, accum: int = 1, save_steps: int = 0, resume: str | None = None,
         optim: str = "adamw_torch") -> None:
    model = tiny_llama(len(TOK), layers=4, seed=1 if resume else 0)  # a resumed run starts from other weights
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(save_strategy="no")
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, learning_rate=1e-2, report_to=[], **save,
                             logging_steps=1, use_cpu=True,
                             disable_tqdm=True, seed=0, optim=optim, lr_scheduler_type="constant",
                             train_sampling_strategy="sequential", ddp_find_unused_parameters=(mode == "ddp"),
                             ddp_broadcast_buffers=False)
    collate = lambda f: data_mod.collate(f, TOK.pad_token_id)  # noqa: E731
    if mode == "grass":
        grass = GrassCallback(**KEYS)
        trainer = GrassTrainer(model=model, args=args, train_dataset=Features(), data_collator=collate,
                               callbacks=[grass])
    else:
        trainer = CountingTrainer(model=model, args=args, train_dataset=Features(), data_collator=collate,
                                  callbacks=[FreezeAllButBlock0()])
    trainer.train(resume_from_checkpoint=resume)
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_step = grass.allreduce_bytes if mode == "grass" else trainer.per_step
    (out / f"bytes.rank{rank}.json").write_text(json.dumps({str(k): v for k, v in per_step.items()}))
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / "weights.pt")
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    if dist.is_initialized():
        # the Trainer (accelerate) leaves the process group to the script; without this, gloo's threads can outlive
        # the interpreter and abort the exit ("terminate called without an active exception", pytorch#190489)
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    kw = dict(a.split("=", 1) for a in sys.argv[3:])
    main(Path(sys.argv[1]), sys.argv[2], int(kw["batch"]), int(kw.get("accum", 1)), int(kw.get("save_steps", 0)),
         kw.get("resume"), kw.get("optim", "adamw_torch"))
