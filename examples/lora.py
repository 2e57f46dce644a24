"""STS with a peft LoRA on the language model: skipped layers skip their adapters too, and the
merged model is a plain checkpoint that loads without sts or peft.

    python examples/lora.py [--model LOCAL_CHECKPOINT] [--data LLAVA.json] [--steps 20] [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import sts
from sts.data.llava import Collator, LlavaDataset

from _tiny import model_and_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out", default="runs/lora")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp))
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)

        sts.apply_sts(model, {"lds": {"alpha": 0.5, "epsilon": 0.5},
                              "vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}})
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|v)_proj",
                                                modules_to_save=["multi_modal_projector"]))
        trainer = Trainer(
            model=lora,
            args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                                   learning_rate=1e-3, logging_steps=5, report_to="none", save_strategy="no",
                                   remove_unused_columns=False),
            train_dataset=LlavaDataset(data, processor),
            data_collator=Collator(processor.tokenizer.pad_token_id),
            callbacks=[sts.STSCallback()],
        )
        trainer.train()
        merged = lora.merge_and_unload()
        sts.remove_sts(merged)
        merged.save_pretrained(Path(args.out) / "model")
        processor.save_pretrained(Path(args.out) / "model")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
