"""STS in a `transformers.Trainer`: two lines, `sts.apply_sts` and `sts.STSCallback()`.

python examples/trainer.py [--model LOCAL_CHECKPOINT] [--data LLAVA.json] [--steps 20]
"""

import tempfile
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import sts
from _tiny import arguments, model_and_data
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset


def build_trainer(model, processor, data: str, out: str, steps: int, learning_rate: float) -> Trainer:
    return Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=learning_rate,
            logging_steps=5,
            report_to="none",
            save_strategy="no",
            remove_unused_columns=False,
        ),
        train_dataset=LlavaDataset(data, processor),
        data_collator=Collator(processor.tokenizer.pad_token_id),
        callbacks=[sts.STSCallback()],
    )


def main(argv=None):
    args = arguments(__doc__, out="runs/example").parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp))
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)

        sts.apply_sts(
            model,
            {
                "vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True},
                "lds": {"alpha": 0.5, "epsilon": 0.5},
            },
        )
        trainer = build_trainer(model, processor, data, args.out, args.steps, learning_rate=1e-4)
        trainer.train()
        sts.remove_sts(model)
        model.save_pretrained(Path(args.out) / "model")  # a plain checkpoint
        processor.save_pretrained(Path(args.out) / "model")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
