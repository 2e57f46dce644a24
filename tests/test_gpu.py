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


@pytest.mark.parametrize("attention, pack", [("sdpa", False), ("flex_attention", False), ("flex_attention", True)])
def test_proportional_attention_on_a_gpu_kernel_is_the_eager_mask(attention, pack, synth_data, processor):
    """Padded, and packed into FlexAttention's block mask (which a CPU cannot build)."""
    from tests.test_callback import batch_of

    batch = {k: v.cuda() for k, v in batch_of(synth_data, processor, size=4).items()}
    base = build_model(TEST_SIZES, seed=0, base=False).cuda().train()
    results = {}
    for implementation in ("eager", attention):
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        vtc = {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}
        sts.apply_sts(model, {"vtc": vtc, "pack": pack and implementation != "eager"})
        sts.set_progress(model, 0, 10)
        loss = model(**batch).loss
        loss.backward()
        results[implementation] = loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (eager_loss, eager_grads), (loss, grads) = results["eager"], results[attention]
    assert torch.allclose(loss, eager_loss, atol=1e-4)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-4), name
