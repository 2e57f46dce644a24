import json
import random

from sts.cli.data.synth import QUESTION_TYPES, ask, generate, random_scene


def read_all(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    generate(tmp_path / "a", train=12, test=3, seed=5)
    generate(tmp_path / "b", train=12, test=3, seed=5)
    generate(tmp_path / "c", train=12, test=3, seed=6)
    a, b, c = (read_all(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_layout_and_question_types(synth_data):
    records = json.loads(synth_data["train"].read_text())
    assert len(records) == 48
    asked = []
    for record in records:
        assert (synth_data["train"].parent / record["image"]).exists()
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * 2
        kinds = [t["type"] for t in turns[::2]]
        assert len(set(kinds)) == 2 and set(kinds) <= set(QUESTION_TYPES)
        assert all(len(t["value"].split()) == 1 for t in turns[1::2]), "answers are one word"
        asked += kinds
    counts = [asked.count(kind) for kind in QUESTION_TYPES]
    assert max(counts) - min(counts) <= 1, f"every type asked equally often: {counts}"


def test_captions_name_every_object_in_reading_order(synth_data):
    for record in json.loads(synth_data["align"].read_text()):
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        scene = sorted(record["scene"], key=lambda o: (o["row"], o["col"]))
        assert gpt["value"].split() == [word for o in scene for word in (o["colour"], o["shape"])]


def test_the_data_has_llava_15s_shape(synth_data, processor):
    """Alignment's captions are mostly visual tokens (LCS-558K: ~93%), instruction tuning's
    conversations ~70% (LLaVA-665K), so the compressor saves here what it saves there."""
    from sts.cli.data.dataset import LlavaDataset

    image = processor.tokenizer.convert_tokens_to_ids("<image>")

    def visual_share(dataset):
        ids = [dataset[i]["input_ids"] for i in range(len(dataset))]
        return sum(int((x == image).sum()) for x in ids) / sum(len(x) for x in ids)

    assert visual_share(LlavaDataset(synth_data["align"], processor, template="plain")) >= 0.85
    assert 0.65 <= visual_share(LlavaDataset(synth_data["train"], processor)) <= 0.75


def test_answers_agree_with_the_scene():
    rng = random.Random(3)
    for _ in range(200):
        scene = random_scene(rng)
        question, answer = ask("count", scene, rng)
        shape = question.split()[2][:-1]
        assert answer == str(sum(o.shape == shape for o in scene))
        question, answer = ask("exist", scene, rng)
        _, _, _, colour, shape = question.rstrip("?").split()
        assert answer == ("yes" if any(o.colour == colour and o.shape == shape for o in scene) else "no")
        question, answer = ask("position", scene, rng)
        obj = next(o for o in scene if o.colour == question.split()[4])
        assert answer == ("left" if obj.col < 2 else "right")
        assert "left" not in question and "right" not in question, "the question must not offer its answers"
        question, answer = ask("colour", scene, rng)
        shape = question.rstrip("?").split()[-1]
        matching = [o for o in scene if o.shape == shape]
        assert len(matching) == 1 and matching[0].colour == answer


def test_bad_counts_are_a_one_line_error(tmp_path, capsys):
    from sts.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--train", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error:") and "--train" in err and "\n" not in err
    assert not (tmp_path / "train.json").exists()
