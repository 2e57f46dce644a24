"""`compile_layers`: the `torch.compile` STS is made for, each repeated block compiled in place.

A decoder layer is the unit STS's skipper leaves out and the unit the cut hands a shorter
sequence, so compiling layer by layer (regional compilation, as torchtune and accelerate's FSDP2
path do) costs STS nothing: a skipped layer is simply not called, and a cut length is one more
(dynamic) shape. Compiled in place, a layer keeps its place and its parameter names, so STS's
hooks, FSDP, DeepSpeed and `save_pretrained` see the model they always see. A whole-model
`torch.compile(model)` works too, but each distinct set of skipped layers is a new graph.
"""

from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every block of the model's layer lists (decoder layers, vision-tower blocks) in place,
    with `torch.compile`'s keyword arguments; returns the model."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile(**compile_kwargs)
    return model
