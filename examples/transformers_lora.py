"""LoRA fine-tuning of a small GPT-2 with the Hugging Face Trainer, watched by freezeframe.

    python examples/transformers_lora.py --out runs/lora
    freezeframe summary runs/lora
    freezeframe report runs/lora -o lora.html

Two `trainer.train()` calls, two stages: "train(max_steps=20)" (warmup, then a linear decay from
lr 1e-2), then a new Trainer on the same model for "train(max_steps=10)" at a lower lr, as one
continues a run. The summary shows the base model bitwise unchanged, the 8 adapter tensors
trained, and the effective update of each LoRA layer (`lora_delta_rel`). The model is GPT-2 built
from a tiny config and the data random token ids, so nothing is downloaded (HF_HUB_OFFLINE=1
works); swap in `AutoModelForCausalLM.from_pretrained(...)` and a tokenized dataset for real work.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from freezeframe.transformers import FreezeFrame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/lora", help="the run directory")
    ap.add_argument("--work", default="runs/lora-trainer", help="the Trainer's output_dir")
    a = ap.parse_args()

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    ids = torch.randint(1, 512, (64, 32)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def args(**kw) -> TrainingArguments:
        return TrainingArguments(output_dir=a.work, report_to=[], save_strategy="no", logging_steps=5,
                                 per_device_train_batch_size=8, disable_tqdm=True, **kw)

    # mode="overwrite": running the example again replaces the run; the second train() appends
    Trainer(model=model, args=args(max_steps=20, learning_rate=1e-2, warmup_steps=4), train_dataset=data,
            callbacks=[FreezeFrame(a.out, mode="overwrite")]).train()
    Trainer(model=model, args=args(max_steps=10, learning_rate=2e-3), train_dataset=data,
            callbacks=[FreezeFrame(a.out)]).train()
    print(f"recorded {a.out}; now: freezeframe summary {a.out}")


if __name__ == "__main__":
    main()
