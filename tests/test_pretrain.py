import torch

from sts.config import TinyModelConfig
from sts.pretrain import NUM_CONTENTS, patch_targets


def test_each_patch_is_labelled_with_its_grid_cell():
    scene = [{"colour": "red", "shape": "circle", "row": 0, "col": 3},
             {"colour": "cyan", "shape": "triangle", "row": 2, "col": 1}]
    targets = patch_targets([scene], TinyModelConfig()).reshape(8, 8)
    red_circle, cyan_triangle = 1, 1 + 5 * 3 + 2
    assert (targets[0:2, 6:8] == red_circle).all()
    assert (targets[4:6, 2:4] == cyan_triangle).all()
    assert int((targets > 0).sum()) == 8, "each object covers the 2x2 patches of its cell"
    assert targets.max() < NUM_CONTENTS


def test_shipped_base_weights_keep_pretraining_state_out_of_the_model():
    from safetensors.torch import load_file

    from sts.models.tiny import BASE_WEIGHTS, build_model

    stored = load_file(str(BASE_WEIGHTS))
    model_keys = set(build_model(base=False).state_dict())
    assert {k for k in stored if not k.startswith("pretrain.")} <= model_keys
    assert all(torch.isfinite(v).all() for v in stored.values())
