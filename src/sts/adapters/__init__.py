"""One adapter per architecture family, behind one protocol (`Adapter`); see docs/adapters.md."""

from __future__ import annotations

from sts.adapters.base import Adapter
from sts.adapters.llava import LlavaAdapter
from sts.adapters.llava_next import LlavaNextAdapter
from sts.adapters.qwen3_vl import Qwen3VLAdapter
from sts.adapters.qwen_vl import QwenVLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, Qwen3VLAdapter]
GUIDE = "docs/adapters.md"


def supported() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.architectures]


class UnsupportedModelError(TypeError):
    """A model class no adapter serves."""


def get_adapter(model) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(
        f"sts has no adapter for {type(model).__name__}; supported: {', '.join(supported())}. "
        f"Adding an architecture is one adapter file: see {GUIDE}"
    )
