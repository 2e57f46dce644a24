import json

from sts.cli.bench import SETTINGS, run_bench
from sts.cli.flops import Shapes
from sts.cli.presets import preset_config


def test_bench_times_every_setting_and_records_json(tmp_path):
    result = run_bench("tiny", steps=2, warmup=1, batch=2, out=tmp_path)
    recorded = json.loads(next(tmp_path.glob("bench-tiny-*.json")).read_text())
    assert recorded == json.loads(json.dumps(result))
    assert list(recorded["settings"]) == [s.name for s in SETTINGS]
    rows = recorded["settings"]
    assert rows["align"]["speedup"] == 1.0 and rows["instruct"]["speedup"] == 1.0
    # Keeping a quarter of 64 visual tokens cuts the alignment step's FLOPs by more than a third.
    assert rows["align+vtc0.25"]["flops_ideal_speedup"] > 1.5
    assert rows["instruct+lds0.5"]["flops_ideal_speedup"] >= 1.0
    assert rows["instruct+pool0.25"]["flops_ideal_speedup"] > 1.5
    assert rows["instruct+sts-off"]["flops_ideal_speedup"] == 1.0
    for row in rows.values():
        assert row["steps_per_s"] > 0 and row["speedup_over_ideal"] > 0


def test_gpu_presets_have_the_published_widths():
    seven_b, text_tokens = preset_config("llava-1.5-7b", layers=None)
    assert text_tokens == {"align": 43, "instruct": 247}, "LLaVA-1.5's caption and conversation lengths"
    shapes = Shapes.of(seven_b)
    assert (shapes.text_hidden, shapes.text_intermediate, shapes.text_layers) == (4096, 11008, 32)
    assert shapes.image_tokens == 576 and shapes.vision_hidden == 1024
    half_b, _ = preset_config("llava-1.5-0.5b", layers=None)
    shapes = Shapes.of(half_b)
    assert (shapes.text_hidden, shapes.text_layers, shapes.text_kv_hidden) == (896, 24, 128)
