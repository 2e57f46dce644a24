"""sts: the Sparse Training Scheme for multimodal LLMs.

The API is imported when first used, so that `import sts` (and the `sts` command's start) does not
pay for transformers' Trainer until `STSCallback` is asked for.
"""

import importlib

API = {
    "LDSConfig": "sts.config",
    "STSCallback": "sts.callback",
    "STSConfig": "sts.config",
    "VTCConfig": "sts.config",
    "apply_sts": "sts.patch",
    "compile_layers": "sts.compiling",
    "remove_sts": "sts.patch",
    "set_progress": "sts.patch",
    "step_stats": "sts.patch",
}
__all__ = sorted(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'sts' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
