"""One adapter per architecture family, behind one protocol (`Adapter`)."""

from __future__ import annotations

from sts.adapters.base import Adapter
from sts.adapters.llava import LlavaAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter]


def get_adapter(model) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    supported = ", ".join(a.architecture for a in ADAPTERS)
    raise TypeError(f"sts has no adapter for {type(model).__name__}; supported: {supported}")
