"""Loading never runs code from files: weights only from safetensors, no checkpoint code unless
trusted, and sts itself never unpickles."""

import json
import re
from pathlib import Path

import torch

import sts
from sts.cli import main
from sts.cli.models.tiny import build_model
from tests.conftest import TEST_SIZES


def train_from(checkpoint: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()  # what writing the checkpoint printed
    status = main(
        ["train", "demo", f"model.path={checkpoint}", "data.train=unused.json", f"output_dir={tmp_path / 'run'}"]
    )
    return status, capsys.readouterr().err


def test_pickled_weights_are_refused_in_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "pickled"
    model = build_model(TEST_SIZES, seed=0, base=False)
    model.save_pretrained(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    torch.save(model.state_dict(), checkpoint / "pytorch_model.bin")  # the pickled format
    status, error = train_from(checkpoint, tmp_path, capsys)
    assert status == 2 and "no safetensors weights" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1


def test_checkpoint_code_does_not_run_unless_trusted(tmp_path, capsys):
    checkpoint = tmp_path / "remote-code"
    build_model(TEST_SIZES, seed=0, base=False).save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    marker = tmp_path / "code-ran"
    config.update(
        model_type="evil-vlm",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForImageTextToText": "modeling_evil.EvilModel",
        },
    )
    (checkpoint / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (checkpoint / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    status, error = train_from(checkpoint, tmp_path, capsys)
    assert status == 2 and "trust_remote_code" in error and "Traceback" not in error
    assert not marker.exists()


def test_sts_loads_nothing_with_pickle():
    source = Path(sts.__file__).parent
    for path in source.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
