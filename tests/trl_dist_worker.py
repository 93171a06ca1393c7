"""One TRL SFTTrainer run with GrassTrainerMixin for tests/test_trl_distributed.py, started by torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/trl_dist_worker.py OUT

Every rank writes its own weights (``weights.rank<r>.pt``) and its trace; rank 0 the Trainer's log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from grass_ft.frontends.hf import GrassCallback, grass_trainer  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

KEYS = dict(method="grass", gamma=2, probe_steps=2, sample_interval=2, update_interval=2, tau=0.5, seed=5,
            probe_mode="measure")


def main(out: Path) -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok), layers=4, seed=0)
    rows = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(5, 10) for b in range(5, 10)]
    args = SFTConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                     lr_scheduler_type="constant", max_length=32, gradient_checkpointing=False,
                     dataset_num_proc=None, ddp_broadcast_buffers=False)
    trainer = grass_trainer(SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                        processing_class=tok, callbacks=[GrassCallback(**KEYS)])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / f"weights.rank{rank}.pt")
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo's threads must not outlive the interpreter (pytorch#190489)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
