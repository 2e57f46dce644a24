"""What only a GPU can show (skipped without one; `benchmarks/gpu.sh` runs them): the engines on
NCCL through `sts train` on one GPU with the skipper on, and proportional attention's key bias
on the GPU's own kernels, gradients included."""

import copy

import pytest
import torch

import sts
from sts.cli.models.tiny import build_model
from tests.conftest import TEST_SIZES
from tests.test_distributed import assert_only_layers_run_are_gathered, assert_ranks_agree
from tests.traced_run import launch, recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_an_engine_on_one_gpu_never_gathers_a_skipped_layer(engine, synth_data, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    overrides = [f"distributed={engine}", "lds.alpha=0.9", "stages.1.max_steps=3"]
    traces = launch(1, tmp_path, *recipe(synth_data, tmp_path / "run", *overrides), launcher=True)
    assert_ranks_agree(traces)
    assert_only_layers_run_are_gathered(traces[0][2:])  # instruction tuning, after alignment's 2 steps


@pytest.mark.parametrize(
    "attention, pack, deep",
    [("sdpa", False, False), ("sdpa", False, True), ("flex_attention", False, False), ("flex_attention", True, False)],
)
def test_proportional_attention_on_a_gpu_kernel_is_the_eager_mask(attention, pack, deep, synth_data, processor):
    """Padded, and packed into FlexAttention's block mask (which a CPU cannot build); with a deep cut,
    whose gathered masks and key bias live on the GPU."""
    from tests.test_callback import batch_of

    batch = {k: v.cuda() for k, v in batch_of(synth_data, processor, size=4).items()}
    base = build_model(TEST_SIZES, seed=0, base=False).cuda().train()
    results = {}
    for implementation in ("eager", attention):
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        vtc = {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}
        if deep:
            vtc["deep_cuts"] = [[0.5, 0.5]]
        sts.apply_sts(model, {"vtc": vtc, "pack": pack and implementation != "eager"})
        sts.set_progress(model, 0, 10)
        loss = model(**batch).loss
        loss.backward()
        results[implementation] = loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (eager_loss, eager_grads), (loss, grads) = results["eager"], results[attention]
    assert torch.allclose(loss, eager_loss, atol=1e-4)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-4), name


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_mask_a_deep_cut_builds_is_on_the_gpu_in_the_hidden_states_dtype(attention):
    """A causal batch without padding comes with no mask; a cut that leaves a row shorter must build
    one where the layers run."""
    from sts.deep import DeepCut

    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[0, 1:5] = True
    real = torch.ones(2, 8, dtype=torch.bool)
    deep = DeepCut([(1, 0.5)], "uniform", visual, real, None, attention)
    hidden = torch.randn(2, 8, 4, device="cuda", dtype=torch.bfloat16)
    assert deep.cut(1, hidden).shape == (2, 8, 4)  # the text-only row keeps its 8
    mask = deep.mask(None)
    assert mask.device.type == "cuda" and mask.shape == (2, 1, 8, 8)
    assert mask.dtype == (torch.bfloat16 if attention == "eager" else torch.bool)
    readable = mask[0, 0, -1] == 0 if attention == "eager" else mask[0, 0, -1]
    assert readable.tolist() == [True] * 6 + [False] * 2, "the image row lost 2 of its 4 tokens: 2 padding keys"
