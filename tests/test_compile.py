"""torch.compile with STS attached: STS's own Python (draws, stats, the cut) runs outside the trace,
so the model compiles as it does without STS, and the losses are the eager ones.

The `eager` backend traces exactly as inductor would (graphs, breaks, guards) without its codegen.
"""

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

import sts
from sts.cli.data.collate import Collator
from sts.cli.data.render import encode
from sts.cli.models.families import save_tiny
from sts.cli.models.tiny import build_model
from tests.conftest import TEST_SIZES
from tests.test_callback import tiny_trainer
from tests.test_families import RECORDS, images  # noqa: F401  (images: a fixture)

STEPS = 6
COMPRESS = {"vtc": {"strategy": "uniform", "keep_ratio": 0.5}}
SKIP = {"lds": {"alpha": 0.8, "epsilon": 0.0}}


@pytest.fixture(scope="module", params=["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"])
def tiny(request, tmp_path_factory, images):  # noqa: F811
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    batch = Collator(processor.tokenizer.pad_token_id)([encode(processor, r, images) for r in RECORDS])
    model.config.get_text_config().use_cache = False
    return model.train(), batch


RUNS = {}


def run(tiny, cfg: dict | None, compile: str | None) -> dict:
    """Losses of STEPS training forwards (STS's progress moving) and what compiling them took; each
    run once per model class (the plain runs are every test's reference)."""
    key = (type(tiny[0]).__name__, json.dumps(cfg, sort_keys=True), compile)
    if key not in RUNS:
        RUNS[key] = fresh_run(tiny, cfg, compile)
    return RUNS[key]


def fresh_run(tiny, cfg: dict | None, compile: str | None) -> dict:
    model, batch = copy.deepcopy(tiny[0]), tiny[1]
    if cfg is not None:
        sts.apply_sts(model, cfg)
    runner = model
    if compile == "whole":
        runner = torch.compile(model, backend="eager")
    elif compile == "regional":
        sts.compile_layers(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    losses, graphs = [], []
    for step in range(STEPS):
        if cfg is not None:
            sts.set_progress(model, step + 1, 2 * STEPS)
        loss = runner(**batch).loss
        loss.backward()
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    breaks = sum(counters["graph_break"].values())
    return {"losses": losses, "graphs": graphs[-1], "breaks": breaks, "graphs_per_step": graphs}


@pytest.mark.parametrize(
    "cfg",
    [{}, {"vtc": {**COMPRESS["vtc"], "full_tokens_final_fraction": 0.99}}],
    ids=["nothing-enabled", "compressor-in-its-full-token-tail"],
)
def test_sts_adds_no_graph_and_no_graph_break_when_not_compressing(tiny, cfg):
    plain = run(tiny, None, "whole")
    patched = run(tiny, cfg, "whole")
    assert (patched["graphs"], patched["breaks"]) == (plain["graphs"], plain["breaks"])
    assert patched["losses"] == pytest.approx(run(tiny, None, None)["losses"], abs=1e-6)


def test_a_compressed_step_compiles_with_a_break_at_the_cut_and_the_eager_loss(tiny):
    plain = run(tiny, None, "whole")
    compressed = run(tiny, COMPRESS, "whole")
    # The cut runs eagerly: a break where the language model is called (dynamo counts it in the frames
    # around it too). No graph per step: the draws, the keep ratio and the step stay outside the trace.
    assert compressed["breaks"] <= plain["breaks"] + 3
    assert compressed["graphs"] <= plain["graphs"] + 1
    assert compressed["graphs_per_step"][1] == compressed["graphs"]  # none after the second step (5.0 recompiles once)
    assert compressed["losses"] == pytest.approx(run(tiny, COMPRESS, None)["losses"], abs=1e-5)


def test_skipped_layers_never_recompile_regionally_compiled_layers(tiny):
    plain = run(tiny, None, "regional")
    skipping = run(tiny, SKIP, "regional")
    # A layer after a skipped one may meet inputs of other properties once (e.g. the embeddings
    # themselves): a graph or two, never one a step.
    assert skipping["graphs"] <= plain["graphs"] + 2
    assert skipping["losses"] == pytest.approx(run(tiny, SKIP, None)["losses"], abs=1e-5)


def test_skipped_layers_under_a_whole_model_compile_give_the_eager_losses(tiny):
    """Whole-model compiling recompiles per skip pattern (each is another layer list), but stays right."""
    assert run(tiny, SKIP, "whole")["losses"] == pytest.approx(run(tiny, SKIP, None)["losses"], abs=1e-5)


def test_compiling_before_attaching_sts_is_a_clear_error(tiny):
    model, batch = copy.deepcopy(tiny[0]), tiny[1]
    runner = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    runner(**batch)
    sts.apply_sts(model, COMPRESS)
    sts.set_progress(model, 1, 10)
    with pytest.raises(RuntimeError, match="compiled before sts.apply_sts"):
        runner(**batch)


def test_a_trainer_with_torch_compile_compresses_every_step(synth_data, processor, tmp_path, caplog):
    callback = sts.STSCallback({"vtc": {"strategy": "uniform", "keep_ratio": 0.25}})
    model = build_model(TEST_SIZES, seed=0, base=False)
    trainer = tiny_trainer(
        model,
        synth_data,
        processor,
        tmp_path,
        [callback],
        max_steps=3,
        torch_compile=True,
        torch_compile_backend="eager",
    )
    trainer.train()
    lines = [line for line in trainer.state.log_history if "sts/visual_tokens_in" in line]
    assert len(lines) == 3
    assert all(0 < line["sts/visual_tokens_kept"] * 4 <= line["sts/visual_tokens_in"] for line in lines)
    assert "compile_layers" not in caplog.text  # nothing to skip: the whole-model compile is fine


def test_a_trainer_compiling_the_whole_model_while_skipping_layers_is_told_to_compile_layers(caplog):
    lds = {"alpha": 0.5, "protect_first": 0, "protect_last": 0}
    model = sts.apply_sts(build_model(TEST_SIZES, seed=0, base=False), {"lds": lds})
    args = TrainingArguments(output_dir="unused", report_to="none", torch_compile=True, use_cpu=True)
    sts.STSCallback().on_train_begin(args, None, None, model=model)
    assert "sts.compile_layers(model)" in caplog.text


def test_compiled_layers_keep_the_models_parameter_names(tiny):
    model = copy.deepcopy(tiny[0])
    names = list(model.state_dict())
    sts.compile_layers(model, backend="eager")
    assert list(model.state_dict()) == names
