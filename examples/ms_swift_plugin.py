"""STS in ms-swift (4.6): a plugin that registers an `sts` Trainer callback.

    swift sft --model Qwen/Qwen2.5-VL-3B-Instruct --dataset ... \\
        --external_plugins examples/ms_swift_plugin.py --callbacks sts

ms-swift imports the files `--external_plugins` names before it builds the Trainer, then makes
each callback `--callbacks` names from `swift.callbacks.callbacks_map` as `callback(args, trainer)`;
`sts.STSCallback(config)` attaches STS to the model when training begins and drives its schedule.
Set the STS config in STS_CONFIG (JSON), or edit the default below.
"""

import json
import os

from swift.callbacks import callbacks_map

import sts

DEFAULT = {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}, "lds": {"alpha": 0.5}}


def sts_callback(args, trainer) -> sts.STSCallback:
    """What ms-swift calls for `--callbacks sts`."""
    return sts.STSCallback(json.loads(os.environ["STS_CONFIG"]) if "STS_CONFIG" in os.environ else DEFAULT)


callbacks_map["sts"] = sts_callback
