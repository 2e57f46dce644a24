"""STS in TRL's `SFTTrainer` with a Qwen2.5-VL checkpoint: build the trainer, then
`sts.apply_sts(trainer.model, ...)` (TRL wraps the model's forward for its fused LM head when it
is built; STS must wrap last) and `callbacks=[sts.STSCallback()]`.

    python examples/sft_trainer.py [--model LOCAL_QWEN2.5-VL_CHECKPOINT] [--data LLAVA.json] [--steps 20]
"""

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

import sts
from _tiny import arguments, model_and_data
from sts.cli.data.records import Records, image_paths, open_image
from sts.cli.data.render import to_messages


def trl_rows(data: str) -> Dataset:
    """LLaVA records as TRL's conversational rows: `messages` and their `images`."""
    records, folder = Records(data), Path(data).parent
    rows = []
    for index in range(len(records)):
        record = records[index]
        paths = image_paths(record)
        rows.append(
            {
                "messages": to_messages(record["conversations"], len(paths)),
                "images": [open_image(folder, path) for path in paths],
            }
        )
    return Dataset.from_list(rows)


def main(argv=None):
    parser = arguments(__doc__, out="runs/sft")
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp), family="Qwen2_5_VLForConditionalGeneration")
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=args.out,
                max_steps=args.steps,
                per_device_train_batch_size=8,
                learning_rate=1e-4,
                logging_steps=max(1, args.steps // 10),
                report_to="none",
                save_strategy="no",
                max_length=None,
                seed=0,
                bf16=torch.cuda.is_available(),
            ),
            train_dataset=trl_rows(data),
            processing_class=processor,
            callbacks=[sts.STSCallback()],
        )
        sts.apply_sts(
            trainer.model,
            {"vtc": {"strategy": "pool", "keep_ratio": args.keep_ratio}, "lds": {"alpha": 0.5, "epsilon": 0.5}},
        )
        trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    main()
