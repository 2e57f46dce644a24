"""Bad input gets one clear line naming the file and the record: `sts data check` lists every
bad record up front, and training either stops at the first (on_bad_sample: error) or leaves
the bad ones out (skip)."""

import copy
import json
import re
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from sts.cli import main
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.data.records import DataError
from sts.cut import IGNORE_INDEX

GOOD = 4  # good records each case starts from; the case spoils record 1 (or the file)


@pytest.fixture
def folder(tmp_path, synth_data):
    """A data folder holding the first records' images, and a corrupt PNG and JPEG."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for record in good_records(synth_data):
        shutil.copy(synth_data["train"].parent / record["image"], images)
    png = (images / "train-000000.png").read_bytes()
    (images / "broken.png").write_bytes(png[: len(png) // 2])
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
    (tmp_path / "outside.png").write_bytes(png)
    return tmp_path / "data"


def good_records(synth_data) -> list[dict]:
    return copy.deepcopy(json.loads(synth_data["train"].read_text())[:GOOD])


def write(folder, records: list[dict]):
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def spoil(change):
    """A case: the good records with `change(record 1)` applied."""

    def case(folder, records):
        change(records[1])
        return write(folder, records)

    return case


def non_utf8(folder, records):
    path = write(folder, records)
    text = path.read_bytes()
    answer = records[1]["conversations"][1]["value"].encode()
    at = text.index(answer, text.index(records[1]["id"].encode()))
    path.write_bytes(text[:at] + b"\xff\xfe" + text[at:])  # Latin-1 bytes in a UTF-8 file
    return path


def long_question(record):
    record["conversations"][0]["value"] += " What color is the circle ?" * 12


RECORD_CASES = {
    "missing image": (spoil(lambda r: r.update(image="images/missing.png")), r"image images/missing.png not found"),
    "corrupt png": (spoil(lambda r: r.update(image="images/broken.png")), r"image images/broken.png cannot be read"),
    "corrupt jpeg": (spoil(lambda r: r.update(image="images/broken.jpg")), r"image images/broken.jpg cannot be read"),
    "more placeholders than images": (
        spoil(lambda r: r["conversations"][2].update(value="<image>\nIs it?")),
        r"2 <image> placeholders but 1 image",
    ),
    "unknown speaker": (
        spoil(lambda r: r["conversations"][1].update({"from": "assistant"})),
        r"turn 1 is from 'assistant'; expected 'human' or 'gpt'",
    ),
    "wrong order": (spoil(lambda r: r["conversations"].reverse()), r"turn 0 is from 'gpt' where 'human' should be"),
    "empty answer": (spoil(lambda r: r["conversations"][1].update(value="  ")), r"turn 1 is an empty answer"),
    "image leaving the folder": (
        spoil(lambda r: r.update(image="../outside.png")),
        r"image path \.\./outside\.png leaves the image folder",
    ),
    "non-utf-8 bytes": (non_utf8, r"not UTF-8 text"),
    "longer than max_length": (spoil(long_question), r"max_length 90 leaves nothing to train on"),
}


def check(path, *options) -> int:
    return main(["data", "check", str(path), *options])


@pytest.mark.parametrize("name", RECORD_CASES)
def test_a_bad_record_is_one_line_naming_file_record_and_problem(name, folder, synth_data, capsys):
    make, problem = RECORD_CASES[name]
    records = good_records(synth_data)
    path = make(folder, records)
    status = check(path, "--max-length", "90")
    out, err = capsys.readouterr()
    named = rf"^{re.escape(str(path))}, record 1( \(id {records[1]['id']}\))?: .*{problem}"
    assert status == 1 and re.search(named, out, re.MULTILINE), out
    assert out.strip().splitlines()[-1] == f"{GOOD} records, 1 bad"
    assert "Traceback" not in out + err


FILE_CASES = {
    "an object, not a list": ('{"id": "x", "conversations": []}', r"it starts with '\{', not '\['"),
    "a list holding a number": ('[{"id": "x", "conversations": []}, 3]', r"after record 0, '3\]'... is not a record"),
    "cut short after a record": ('[{"id": "x", "conversations": []},', r"no '\]' closes it after record 0"),
}


@pytest.mark.parametrize("name", FILE_CASES)
def test_a_file_that_is_not_a_list_of_records_is_the_usual_one_line_error(name, tmp_path, capsys):
    text, problem = FILE_CASES[name]
    path = tmp_path / "data.json"
    path.write_text(text)
    assert check(path) == 2
    out, err = capsys.readouterr()
    assert re.fullmatch(
        rf"sts: error: {re.escape(str(path))} is not a JSON list of LLaVA records: {problem}.*\n", err
    ), err
    assert "Traceback" not in out + err


def test_a_missing_file_is_the_usual_one_line_error(tmp_path, capsys):
    assert check(tmp_path / "nowhere.json") == 2
    assert capsys.readouterr().err == f"sts: error: no data file at {tmp_path / 'nowhere.json'}\n"


def test_good_data_checks_clean(synth_data, capsys):
    assert check(synth_data["train"], "--max-length", "90") == 0
    assert capsys.readouterr().out == "48 records, 0 bad\n"


def test_every_bad_record_is_listed(folder, synth_data, capsys):
    records = good_records(synth_data)
    records[0]["conversations"][1]["value"] = ""
    records[3]["image"] = "images/broken.png"
    assert check(write(folder, records)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0].split(", ")[-1] for line in lines[:-1]] == [
        "record 0 (id train-000000)",
        "record 3 (id train-000003)",
    ]
    assert lines[-1] == "4 records, 2 bad"


def test_validate_stops_at_the_first_bad_record(folder, synth_data, processor):
    records = good_records(synth_data)
    records[2]["conversations"][1]["from"] = "bot"
    dataset = LlavaDataset(write(folder, records), processor, on_bad_sample="error")
    with pytest.raises(DataError, match=r"data.json, record 2 \(id train-000002\): turn 1 is from 'bot'"):
        dataset.validate()


def mixed(folder, synth_data) -> tuple[list[dict], list[int]]:
    """Good records with bad ones among them (three that the cheap checks find, and a corrupt
    image found only while encoding); the numbers of the good ones."""
    good = good_records(synth_data)
    bad = copy.deepcopy(good[:4])
    bad[0]["conversations"].reverse()
    bad[1]["conversations"][1]["value"] = ""
    bad[2]["image"] = "images/missing.png"
    bad[3]["image"] = "images/broken.png"
    records = [good[0], bad[0], good[1], bad[3], bad[1], good[2], bad[2], good[3]]
    return records, [0, 2, 5, 7]


def test_skip_leaves_bad_records_out_even_in_dataloader_workers(folder, synth_data, processor, caplog):
    records, good = mixed(folder, synth_data)
    path = write(folder, records)
    dataset = LlavaDataset(path, processor, on_bad_sample="skip")
    dataset.validate()
    assert len(dataset) == 5 and dataset.skipped == 3
    assert [line.split(": ")[0].split(", ")[-1] for line in caplog.messages] == [
        "record 1 (id train-000000)",
        "record 4 (id train-000001)",
        "record 6 (id train-000002)",
    ]
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=Collator(processor.tokenizer.pad_token_id))
    rows = [ids[mask.bool()] for batch in loader for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    reference = LlavaDataset(path, processor)
    served = [0, 2, 5, 5, 7]  # record 3's image is corrupt: the next good record (5) fills its place
    assert len(rows) == len(served) and set(served) == set(good)
    assert all(torch.equal(row, reference[number]["input_ids"]) for row, number in zip(rows, served))
    assert dataset.skipped == len(records) - len(good), "the corrupt image, found in a worker, is counted"
    assert len(dataset.lengths()) == len(dataset)


def test_a_bad_sample_found_in_a_dataloader_worker_is_one_line(folder, synth_data, processor):
    records = good_records(synth_data)
    records[1]["image"] = "images/broken.png"
    dataset = LlavaDataset(write(folder, records), processor)
    dataset.validate()
    with pytest.raises(DataError) as raised:
        list(DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=Collator(0)))
    assert "Traceback" in str(raised.value), "PyTorch puts the worker's traceback in the message"
    assert re.fullmatch(
        r".*data.json, record 1 \(id train-000001\): image images/broken.png cannot be read \(.*\)",
        raised.value.headline,
    )


def test_skipping_changes_nothing_a_good_record_encodes_to(synth_data, processor):
    strict, lenient = (LlavaDataset(synth_data["train"], processor, on_bad_sample=mode) for mode in ("error", "skip"))
    lenient.validate()
    for index in range(3):
        sample, same = strict[index], lenient[index]
        assert sample.keys() == same.keys() and all(torch.equal(sample[k], same[k]) for k in sample)
        assert (sample["labels"] != IGNORE_INDEX).any()


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_sts_train_stops_at_a_bad_record_or_skips_and_counts_them(mode, folder, synth_data, tmp_path, capsys):
    from tests.test_end_to_end import tiny_overrides

    records, good = mixed(folder, synth_data)
    path = write(folder, records)
    overrides = [
        *tiny_overrides(synth_data, tmp_path / "run"),
        f"data.train={path}",
        "stages.0.data=null",
        "stages.0.batch_size=2",
        "stages.1.batch_size=2",
        f"data.on_bad_sample={mode}",
    ]
    status = main(["train", "demo", *overrides])
    out, err = capsys.readouterr()
    if mode == "error":
        assert status == 2 and re.search(r"sts: error: .*data.json, record 1 \(id train-000000\)", err)
        assert "Traceback" not in err and not (tmp_path / "run").exists()
    else:
        assert status == 0 and f"{path}: skipped {len(records) - len(good)} bad record(s)" in out, err[-2000:]
