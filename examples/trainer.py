"""STS in a `transformers.Trainer`: two lines, `sts.apply_sts` and `sts.STSCallback()`.

    python examples/trainer.py [--model LOCAL_CHECKPOINT] [--data LLAVA.json] [--steps 20]
"""

import argparse
import tempfile
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import sts
from sts.data.llava import Collator, LlavaDataset

from _tiny import model_and_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out", default="runs/example")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp))
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)

        sts.apply_sts(model, {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True},
                              "lds": {"alpha": 0.5, "epsilon": 0.5}})
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                                   learning_rate=1e-4, logging_steps=5, report_to="none", save_strategy="no",
                                   remove_unused_columns=False),
            train_dataset=LlavaDataset(data, processor),
            data_collator=Collator(processor.tokenizer.pad_token_id),
            callbacks=[sts.STSCallback()],
        )
        trainer.train()
        sts.remove_sts(model)
        model.save_pretrained(Path(args.out) / "model")  # a plain checkpoint
        processor.save_pretrained(Path(args.out) / "model")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
