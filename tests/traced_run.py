"""A run that records what it did at every step: run by `torchrun` in the distributed tests (or
alone, as the one-process reference), and killed and resumed in the resume test.

    traced_run.py recipe OUT RECIPE [key=value ...]   `sts train`, as a library call
                                                              (DDP, or DeepSpeed ZeRO)
    traced_run.py fsdp OUT DATA.json STEPS ACCUMULATION SKIPPER   a plain loop, FSDP2
                                                                     when launched on 2 processes

Each rank writes OUT/trace.rank{R}.json when the run ends: per optimizer step, what STS did in
each forward (skipped layers, visual tokens kept), the logged loss (recipe runs) and, under FSDP or
ZeRO-3, what was gathered: the FSDP modules, or ZeRO-3's parameters, by name.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

import sts
import sts.cli.train
from sts.adapters import get_adapter
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.distributed import rank, world_size
from sts.cli.models.tiny import build_model, build_processor
from sts.cli.recipes import TinyModelConfig, load_recipe

SIZES = TinyModelConfig(
    vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=4, text_heads=2, text_intermediate=128
)
BATCH = 4
gathered: list[str] = []
trace: list[dict] = []
original_unshard = FSDPParamGroup.unshard


def counting_unshard(self, *args, **kwargs):
    gathered.append(self._module_fqn)
    return original_unshard(self, *args, **kwargs)


def record_step(step: int, forwards: list[dict]) -> None:
    """What the step's forwards did, and what FSDP gathered since the last step."""
    forwards = [{key: forward[key] for key in ("skipped_layers", "visual_tokens_kept")} for forward in forwards]
    trace.append({"step": step, "gathered": list(gathered), "forwards": forwards})
    gathered.clear()


def count_deepspeed_gathers() -> None:
    """Record the parameters ZeRO-3 gathers (prefetches included), by their id until named."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    original = Coordinator._PartitionedParameterCoordinator__all_gather_params

    def counting(self, params, forward):
        gathered.extend(id(param) for param in params)
        return original(self, params, forward)

    Coordinator._PartitionedParameterCoordinator__all_gather_params = counting


class TracingMeter(sts.cli.train.StepMeter):
    def on_step_end(self, args, state, control, **kwargs):
        names = {id(param): name for name, param in self.model.named_parameters()}
        gathered[:] = [names.get(item, item) for item in gathered]  # ZeRO-3's parameters by name
        record_step(state.global_step, list(self.model._sts_state.history))  # before the meter drains them
        super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            trace[-1]["loss"] = logs["loss"]
        super().on_log(args, state, control, logs=logs, **kwargs)


def train_fsdp(out: Path, data: str, steps: int, accumulation: int, skipper: bool) -> None:
    """The README's plain loop, with FSDP2 (`fully_shard` per decoder layer, then the root) when
    there are several processes. Global batch per step: BATCH x processes x accumulation."""
    if world_size() > 1:
        dist.init_process_group("gloo")
    model = build_model(SIZES, seed=0, base=False)
    processor = build_processor(SIZES)
    adapter = get_adapter(model)
    adapter.set_trainable({"vision_tower": "frozen", "projector": "full", "language_model": "full"})
    sts.apply_sts(model, {"vtc": {"strategy": "uniform"}, "lds": {"alpha": 0.9} if skipper else None})
    if world_size() > 1:
        for layer in adapter.decoder_layers():
            fully_shard(layer)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dataset, collate = LlavaDataset(data, processor), Collator(processor.tokenizer.pad_token_id)
    for step in range(steps):
        sts.set_progress(model, step, steps)
        for micro in range(accumulation):
            first = (step * world_size() * accumulation + rank() * accumulation + micro) * BATCH
            batch = collate([dataset[i] for i in range(first, first + BATCH)])
            (model(**batch).loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        record_step(step + 1, sts.patch.drain_stats(model))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        sts.remove_sts(model)
        model.save_pretrained(out / "model", state_dict=weights)
    if world_size() > 1:
        dist.barrier()  # no rank tears gloo down while another still saves (a rare abort at exit)
        dist.destroy_process_group()


LAUNCH_TIMEOUT_S = 300


def command(processes: int, out: Path, *args: str, launcher: bool = False) -> tuple[list[str], dict]:
    """The command line and environment that run this script on `processes` processes; through
    torchrun if several, or if `launcher` (an engine on one process)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    line = [*(torchrun if processes > 1 or launcher else [sys.executable]), __file__, args[0], str(out), *args[1:]]
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    return line, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # where sts runs uninstalled too


def launch(processes: int, out: Path, *args: str, launcher: bool = False) -> list[list[dict]]:
    """Run this script to the end, bounded by a timeout (a hang fails); each rank's trace."""
    out.mkdir(parents=True, exist_ok=True)
    line, environment = command(processes, out, *args, launcher=launcher)
    done = subprocess.run(line, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"trace.rank{rank}.json").read_text()) for rank in range(processes)]


def recipe(synth_data, out: Path, *overrides: str) -> list[str]:
    """Arguments of a recipe run: the demo recipe on the test data and SIZES, short stages."""
    sizes = [f"model.tiny.{key}={value}" for key, value in SIZES.model_dump().items()]
    return [
        "recipe",
        "demo",
        f"data.train={synth_data['train']}",
        f"stages.0.data.train={synth_data['align']}",
        f"output_dir={out}",
        "model.base=false",
        "stages.0.max_steps=2",
        "stages.1.max_steps=3",
        "stages.0.batch_size=4",
        "stages.1.batch_size=4",
        *sizes,
        *overrides,
    ]


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    out = Path(out)
    FSDPParamGroup.unshard = counting_unshard
    if mode == "recipe":
        sts.cli.train.StepMeter = TracingMeter
        if any(value.startswith("distributed=zero") for value in rest):
            count_deepspeed_gathers()
        sts.cli.train.run_recipe(load_recipe(rest[0], rest[1:]))
    else:
        data, steps, accumulation, skipper = rest
        train_fsdp(out, data, int(steps), int(accumulation), skipper == "skipper")
    (out / f"trace.rank{rank()}.json").write_text(json.dumps(trace))
