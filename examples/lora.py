"""STS with a peft LoRA on the language model: skipped layers skip their adapters too, and the
merged model is a plain checkpoint that loads without sts or peft.

    python examples/lora.py [--model LOCAL_CHECKPOINT] [--data LLAVA.json] [--steps 20] [--out DIR]
"""

import tempfile
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

import sts
from _tiny import arguments, model_and_data
from trainer import build_trainer


def main(argv=None):
    args = arguments(__doc__, out="runs/lora").parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp))
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)

        sts.apply_sts(
            model,
            {
                "lds": {"alpha": 0.5, "epsilon": 0.5},
                "vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True},
            },
        )
        lora = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=r".*language_model.*\.(q|v)_proj",
                modules_to_save=["multi_modal_projector"],
            ),
        )
        trainer = build_trainer(lora, processor, data, args.out, args.steps, learning_rate=1e-3)  # as trainer.py
        trainer.train()
        merged = lora.merge_and_unload()
        sts.remove_sts(merged)
        merged.save_pretrained(Path(args.out) / "model")
        processor.save_pretrained(Path(args.out) / "model")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
