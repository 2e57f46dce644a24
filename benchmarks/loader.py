"""The data pipeline at LLaVA-665K's size: memory and batches/s.

Writes a 665K-record LLaVA JSON over a few hundred synthetic images (multi-turn
conversations; every 10th record text-only, every 7th with two images), then reads it the way
`sts train` does (lazy records, encoding in DataLoader workers, LLaVA-1.5's 336-px
preprocessing and 576 image tokens) for 1000 shuffled batches, sampling the memory (proportional set
size) of the main process and its workers. Run: `python benchmarks/loader.py [--records N]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.data.synth import generate
from sts.cli.models.tiny import build_processor
from sts.cli.recipes import TinyModelConfig


def resident_bytes(pid: int) -> int:
    """Proportional set size: pages shared with the parent (forked workers) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):  # a worker that has just exited
        return 0


def family_resident_bytes() -> int:
    """This process and its children (the DataLoader's workers)."""
    me, total = os.getpid(), resident_bytes(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if parent == me:
                total += resident_bytes(int(entry))
    return total


def write_records(folder: Path, records: int, images: int) -> Path:
    """`records` LLaVA records cycling over the conversations of `images` synthetic images,
    written one at a time (holding them all would inflate this process's memory)."""
    base = json.loads(generate(folder, train=images, test=1, seed=0, questions=4)["train"].read_text())
    path = folder / "big.json"
    with open(path, "w") as out:
        out.write("[")
        for index in range(records):
            out.write(("," if index else "") + json.dumps(one_record(base, index)))
        out.write("]")
    return path


def one_record(base: list[dict], index: int) -> dict:
    """Record `index`: a conversation of the base set; every 10th text-only, every 7th with two images."""
    record = dict(base[index % len(base)], id=f"r{index}")
    if index % 10 == 0:
        record.pop("image")
        record["conversations"] = [dict(t, value=t["value"].replace("<image>\n", "")) for t in record["conversations"]]
    elif index % 7 == 0:
        record["image"] = [record["image"], base[(index + 1) % len(base)]["image"]]
        turns = [dict(t) for t in record["conversations"]]
        turns[2]["value"] = "<image>\n" + turns[2]["value"]
        record["conversations"] = turns
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = write_records(Path(tmp), args.records, args.images)
        written, json_mb = time.perf_counter() - started, path.stat().st_size / 2**20
        before = family_resident_bytes()
        started = time.perf_counter()
        dataset = LlavaDataset(path, build_processor(TinyModelConfig(image_size=336, patch_size=14)))
        indexed = time.perf_counter() - started
        after_index = family_resident_bytes()
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            collate_fn=Collator(dataset.processor.tokenizer.pad_token_id),
        )
        peak, running = [after_index], True

        def sample():
            while running:
                peak.append(family_resident_bytes())
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        samples = 0
        for count, batch in enumerate(tqdm(loader, total=args.batches, desc="batches"), start=1):
            samples += len(batch["input_ids"])
            if count == args.batches:
                break
        seconds = time.perf_counter() - started
        running = False
        sampler.join()

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "command": f"python benchmarks/loader.py --records {args.records} --images {args.images} "
        f"--batches {args.batches} --batch-size {args.batch_size} --workers {args.workers}",
        "records": len(dataset),
        "json_mb": round(json_mb, 1),
        "write_seconds": round(written, 1),
        "index_seconds": round(indexed, 1),
        "resident_mb": {
            "before_index": round(before / 2**20),
            "after_index": round(after_index / 2**20),
            "peak_while_iterating": round(max(peak) / 2**20),
        },
        "batches": args.batches,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "batches_per_s": round(args.batches / seconds, 2),
        "samples_per_s": round(samples / seconds, 1),
    }
    print(json.dumps(result, indent=2))
    path = Path(args.out) / f"loader-{args.records}-records.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
