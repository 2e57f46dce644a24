"""One adapter per architecture family, behind one protocol (`Adapter`); see docs/adapters.md."""

from __future__ import annotations

from sts.adapters.base import Adapter
from sts.adapters.llava import LlavaAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter]
GUIDE = "docs/adapters.md"


def supported() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.architectures]


def get_adapter(model) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise TypeError(f"sts has no adapter for {type(model).__name__}; supported: {', '.join(supported())}. "
                    f"Adding an architecture is one adapter file: see {GUIDE}")
