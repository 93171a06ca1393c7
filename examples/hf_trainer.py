"""GRASS inside a plain transformers.Trainer run: the callback is all that changes.

    python examples/hf_trainer.py            # the packaged SmolLM2-135M, 20 steps on CPU
"""

import torch
from transformers import Trainer, TrainingArguments

from grass_ft import GrassCallback
from grass_ft.data import collate, generate_examples, tokenize_example
from grass_ft.models import load_model_and_tokenizer

model, tok = load_model_and_tokenizer("smollm2-135m")
features = [tokenize_example(tok, ex, 256) for ex in generate_examples("gsm-mix", 256, seed=0)]


class Features(torch.utils.data.Dataset):
    def __len__(self):
        return len(features)

    def __getitem__(self, i):
        return features[i]


args = TrainingArguments(output_dir="runs/hf-grass", max_steps=20, per_device_train_batch_size=4, learning_rate=1e-4,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
trainer = Trainer(model=model, args=args, train_dataset=Features(),
                  data_collator=lambda batch: collate(batch, tok.pad_token_id),
                  callbacks=[GrassCallback(method="grass", gamma=4, probe_steps=2, sample_interval=5)])
trainer.train()
print("layers trace:", f"{args.output_dir}/layers.jsonl")
