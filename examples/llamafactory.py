"""STS in LLaMA-Factory (0.9.5): the training YAML you already run, plus one callback.

    python examples/llamafactory.py qwen2_5vl_full_sft.yaml      # instead of: llamafactory-cli train ...

LLaMA-Factory builds the model and the Trainer itself and takes Trainer callbacks through
`llamafactory.train.tuner.run_exp(args, callbacks)`; `sts.STSCallback(config)` attaches STS to the
model when training begins and drives its schedule. Edit STS below (or load it from a file).
"""

import sys

import yaml

import sts

STS = {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}, "lds": {"alpha": 0.5}}


def main(argv: list[str] | None = None) -> None:
    from llamafactory.train.tuner import run_exp

    (recipe,) = argv if argv is not None else sys.argv[1:]
    with open(recipe) as file:
        args = yaml.safe_load(file)
    run_exp(args, callbacks=[sts.STSCallback(STS)])


if __name__ == "__main__":
    main()
