"""`sts demo | data synth | data check | train | eval | bench | pretrain-base`."""

from __future__ import annotations

import argparse
import importlib.util
import sys

# The `cli` extra of pyproject.toml, which the command needs beside the method: distribution -> its module.
CLI_EXTRA = {
    "accelerate": "accelerate",
    "pyyaml": "yaml",
    "safetensors": "safetensors",
    "pillow": "PIL",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
}

# `sts.cli.presets.PRESETS`' and `sts.cli.demo.PRESETS`' names, here so that parsing imports no
# transformers (tests keep them equal).
DEMO_PRESETS = ["llava-1.5", "llava-next"]
BENCH_PRESETS = [
    "tiny",
    "tiny-llava-next",
    "tiny-qwen2.5-vl",
    "llava-1.5-7b",
    "llava-1.5-0.5b",
    "llava-next-7b",
    "qwen2.5-vl-7b",
]


def cmd_data(args) -> None:
    from sts.cli.data.synth import generate

    sizes = {"questions": args.questions, "align": args.align, "image_size": args.image_size}
    paths = generate(args.out, args.train, args.test, args.seed, **sizes)
    print(
        "wrote "
        + ", ".join(
            f"{path} ({count} records)"
            for path, count in zip(paths.values(), [args.align, args.train, args.test][-len(paths) :])
        )
    )


def cmd_data_check(args) -> int:
    from functools import partial

    from tqdm import tqdm

    from sts.cli.data.check import load_processor, problems
    from sts.cli.data.dataset import LlavaDataset

    processor = load_processor(args.model) if args.max_length else None
    dataset = LlavaDataset(args.data, processor, args.images, args.template, max_length=args.max_length)
    encode = partial(dataset.encoded, max_length=args.max_length) if args.max_length else None
    bad = 0
    for message in problems(dataset.records, dataset.images_dir, encode=encode):
        tqdm.write(message)
        bad += 1
    print(f"{len(dataset)} records, {bad} bad")
    return 1 if bad else 0


def cmd_train(args) -> None:
    from sts.cli.distributed import is_main, label_logs_with_rank
    from sts.cli.recipes import load_recipe

    recipe = load_recipe(args.config, args.overrides)  # a wrong one is refused before training's imports
    from sts.cli.train import run_recipe

    label_logs_with_rank()
    result = run_recipe(recipe)
    if not is_main():
        return
    trained = [stage for stage in result["stages"] if not stage.get("done_before")]
    print(f"trained {len(trained)} stage(s) in {result['train_seconds']:.1f}s; model: {result['model_dir']}")
    for stage in result["stages"]:
        if stage.get("done_before"):
            print(f"  {stage['name']}: finished before this run (resume), kept")
        elif stage["dropped_steps"]:
            print(
                f"  {stage['name']}: dropped step(s) {stage['dropped_steps']}, whose loss or gradient was not "
                "finite (the warnings say which)"
            )
    for path, count in result["skipped_records"].items():
        print(f"  {path}: skipped {count} bad record(s) (data.on_bad_sample: skip; the warnings name them)")


def cmd_eval(args) -> None:
    from sts.cli.evaluate import evaluate, format_table, write_json

    result = evaluate(args.model, args.data, args.images, batch_size=args.batch_size, limit=args.limit)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)


def cmd_demo(args) -> None:
    from sts.cli.demo import run_demo, select_recipes

    run_demo(
        args.out,
        train=args.train,
        test=args.test,
        seed=args.seed,
        recipes=select_recipes(args.recipe, args.preset),
        seeds=parse_seeds(args.seeds),
        equal_time=not args.no_equal_time,
        preset=args.preset,
    )


def parse_seeds(text: str) -> list[int]:
    from sts.cli.recipes import ConfigError

    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def cmd_bench(args) -> None:
    from sts.cli.bench import run_bench

    run_bench(
        args.preset,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        layers=args.layers,
        settings=args.settings.split(",") if args.settings else None,
        out=args.out,
        compile=args.compile,
        optimizer=args.optimizer,
        checkpointing=not args.no_checkpointing,
        lengths=args.lengths,
        attention=args.attention,
        packing=args.packing,
        profile=args.profile,
    )


def cmd_pretrain_base(args) -> None:
    from sts.cli.pretrain import pretrain_base

    pretrain_base(
        args.out,
        records=args.records,
        vision_steps=args.vision_steps,
        language_steps=args.language_steps,
        seed=args.seed,
        family=args.family,
        resume=args.resume,
    )


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (a wrong one is argparse's one-line usage error)."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    count.__name__ = "integer"  # how argparse names the type in its message for a non-number
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sts", description="Sparse Training Scheme for multimodal LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthetic data -> train the tiny LLaVA -> evaluate, in minutes on a CPU")
    demo.add_argument(
        "--out", help="folder for data, models, figures and results.json (default: runs/demo, runs/demo-PRESET)"
    )
    demo.add_argument(
        "--preset",
        default="llava-1.5",
        choices=DEMO_PRESETS,
        help="llava-1.5: the tiny LLaVA (64 visual tokens an image); llava-next: the same in LLaVA-NeXT's anyres "
        "form (336 visual tokens an image; about 30 minutes a seed on 2 CPU cores)",
    )
    demo.add_argument(
        "--train",
        type=at_least(1),
        default=4000,
        help="training images: as many captions for alignment and conversations for instruction tuning",
    )
    demo.add_argument("--test", type=at_least(1), default=750, help="test images (two questions each)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo.add_argument(
        "--seeds",
        default="0",
        help="training seeds, comma-separated (e.g. 0,1,2): every recipe "
        "is trained with each; the table shows means with min-max",
    )
    demo.add_argument(
        "--no-equal-time",
        action="store_true",
        help="skip the baseline-equal-time row (the dense recipe cut to the fastest STS recipe's time)",
    )
    demo.add_argument(
        "--recipe",
        action="append",
        metavar="NAME[='key=value ...']",
        help="run these recipes (repeatable; default: the preset's, for llava-1.5 baseline, sts and sts-full-tail): "
        "a shipped name, or a new name with overrides of the demo recipe; baseline always runs",
    )
    demo.set_defaults(run=cmd_demo)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a Sort-of-CLEVR-style VQA set in the LLaVA format")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=4000, help="conversations (train.json)")
    synth.add_argument("--test", type=int, default=750, help="test conversations (test.json)")
    synth.add_argument("--questions", type=int, default=2, help="questions per conversation, of distinct types")
    synth.add_argument("--align", type=int, default=4000, help="caption records for alignment (align.json); 0: none")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--image-size", type=int, default=64, help="px a side, a multiple of 64 (128 for model.family=llava-next)"
    )
    synth.set_defaults(run=cmd_data)
    check = data.add_parser(
        "check", help="find every bad record of a LLaVA-format JSON file (one line each); exit status 1 if there is one"
    )
    check.add_argument("data", help="the LLaVA-format JSON file")
    check.add_argument("--images", help="image folder; defaults to the JSON file's folder")
    check.add_argument(
        "--max-length",
        type=at_least(1),
        help="also check that every sample, encoded and truncated as "
        "training does, keeps its images whole and an answer to train on",
    )
    check.add_argument(
        "--model",
        help="a local checkpoint folder whose processor encodes for --max-length (default: the embedded tiny model's)",
    )
    check.add_argument(
        "--template",
        choices=["chat", "plain"],
        default="chat",
        help="the format --max-length encodes in (data.template)",
    )
    check.set_defaults(run=cmd_data_check)

    train = commands.add_parser("train", help="run a recipe of stages")
    train.add_argument("config", help="a YAML recipe, or a shipped recipe's name (e.g. demo)")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. stages.0.learning_rate=1e-3")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="exact-match VQA accuracy of a saved model")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="a LLaVA-format JSON test file")
    evaluate.add_argument("--images", help="image folder; defaults to the JSON file's folder")
    evaluate.add_argument("--json", help="also write the result here")
    evaluate.add_argument("--batch-size", type=at_least(1), default=64)
    evaluate.add_argument("--limit", type=at_least(1), help="only the first N records")
    evaluate.set_defaults(run=cmd_eval)

    bench = commands.add_parser("bench", help="training throughput, baseline and STS interleaved, random weights")
    bench.add_argument("--preset", default="tiny", choices=BENCH_PRESETS, help="model shapes (sts.cli.presets)")
    bench.add_argument("--steps", type=at_least(1), default=10, help="timed steps per setting")
    bench.add_argument("--warmup", type=at_least(0), default=2)
    bench.add_argument("--batch", type=at_least(1), default=8)
    bench.add_argument("--layers", type=at_least(1), help="decoder layers (default: the preset's own, 32 for the 7B)")
    bench.add_argument("--settings", help="comma-separated subset of the settings")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    bench.add_argument(
        "--compile",
        default="none",
        choices=["none", "whole", "regional"],
        help="torch.compile the whole model, or each repeated block in place (regional)",
    )
    bench.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="adamw is fused on a GPU")
    bench.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="no activation checkpointing (default: in instruction tuning, as the shipped recipes)",
    )
    bench.add_argument(
        "--lengths",
        default="grouped",
        choices=["grouped", "sampled", "fixed"],
        help="text lengths drawn from a LLaVA-665K-shaped distribution with text-only samples, batched by length "
        "as LLaVA's padded training groups them (grouped) or not (sampled); or each stage's mean (fixed)",
    )
    bench.add_argument(
        "--attention",
        choices=["flash_attention_2", "flash_attention_3", "sdpa", "flex_attention", "eager"],
        help="the attention kernel (default: flash_attention_2 where installed, else sdpa)",
    )
    bench.add_argument(
        "--packing",
        default="auto",
        choices=["auto", "on", "off"],
        help="padding-free batches for the dense baseline and STS (auto: where the kernel skips across samples)",
    )
    bench.add_argument(
        "--profile", action="store_true", help="one more step of each setting under torch.profiler, in the record"
    )
    bench.set_defaults(run=cmd_bench)

    pretrain = commands.add_parser("pretrain-base", help="re-create the tiny model's shipped base weights")
    pretrain.add_argument("--out", default="runs/pretrain-base")
    pretrain.add_argument("--records", type=at_least(1), default=12000)
    pretrain.add_argument("--vision-steps", type=at_least(0), default=150)
    pretrain.add_argument("--language-steps", type=at_least(0), default=4500)
    pretrain.add_argument(
        "--family",
        choices=["llava", "llava-next"],
        default="llava",
        help="llava-next: continue the LLaVA form's language model on the anyres form's image-token layout",
    )
    pretrain.add_argument("--resume", action="store_true", help="continue the language model from the shipped weights")
    pretrain.add_argument("--seed", type=int, default=1234)
    pretrain.set_defaults(run=cmd_pretrain_base)
    return parser


def missing_extras() -> list[str]:
    """The distributions of the `cli` extra that cannot be imported here."""

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            return False

    return [distribution for distribution, module in CLI_EXTRA.items() if not importable(module)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_extras()
    if missing:
        print(
            f"sts: error: the sts command needs its cli extra (missing: {', '.join(missing)}); "
            "pip install 'sts-mllm[cli]'",
            file=sys.stderr,
        )
        return 2
    tracked = LineTracker(sys.stderr)
    sys.stderr = tracked
    try:
        return args.run(args) or 0
    except Exception as error:
        if not caused_by_the_user(error):
            raise
        message = getattr(error, "headline", str(error))
        for bar in list(getattr(getattr(sys.modules.get("tqdm"), "tqdm", None), "_instances", [])):
            bar.close()  # the progress bars the error interrupted
        print(("" if tracked.at_line_start else "\n") + f"sts: error: {one_line(message)}", file=sys.stderr)
        return 2
    finally:
        sys.stderr = tracked.stream


# The errors a user can cause, said in one line, by the module that defines them. Only a module
# already loaded can have raised its own, so the command's start imports none of them.
USER_ERRORS = {
    "sts.adapters": ("UnsupportedModelError",),
    "sts.cli.data.records": ("DataError",),
    "sts.cli.recipes": ("ConfigError",),
    "sts.cli.runs": ("RunError", "TrainingError"),
}


def caused_by_the_user(error: Exception) -> bool:
    """An OS error (a path, a disk) or one of sts's own errors above."""
    kinds = [
        getattr(sys.modules[module], name)
        for module, names in USER_ERRORS.items()
        if module in sys.modules
        for name in names
    ]
    return isinstance(error, (OSError, *kinds))


def one_line(message: str) -> str:
    """The message on one line, whatever the user's data put in it."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class LineTracker:
    """stderr, remembering whether what was last written to it ended a line (a progress bar ends
    its updates with a carriage return), so that an error can start a line of its own."""

    def __init__(self, stream):
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)
