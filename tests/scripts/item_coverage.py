"""Launched with 2 processes: which items each process reads in one epoch (map-style, through train.py's loaders and
`accelerator.prepare`) and in one pass of the stream (its own shards), and a streamed run's held-out validation items
(train.py's load_data) with those each process evaluates, as content hashes in <out>/rank<r>.json."""

import hashlib
import json
import sys
from pathlib import Path

from modeling_poolformer import PoolformerConfig
from training.data import DataArguments, build_datasets
from training.train import TrainArguments, load_data, make_accelerator, make_loaders

folder, out = sys.argv[1], Path(sys.argv[2])
args = TrainArguments(output_dir=str(out / "unused"), batch_size=2, log_with="none")
accelerator = make_accelerator(args)
seen = {}
for streaming in (False, True):
    data_args = DataArguments(dataset=folder, seq_len=800, mode="window", streaming=streaming, shuffle_buffer=8)
    _, _, sets = build_datasets(data_args, PoolformerConfig(), accelerator.process_index, accelerator.num_processes)
    if streaming:
        sets["train"].repeat = False  # one pass
        batches = make_loaders(sets, args, accelerator)[0]
    else:
        train_dl, _ = make_loaders(sets, args, accelerator)
        batches = accelerator.prepare(train_dl)
    seen["streaming" if streaming else "map"] = [hashlib.sha1(row.numpy().tobytes()).hexdigest()
                                                 for batch in batches for row in batch["input_ids"]]
    if not streaming:
        seen["map_all"] = [hashlib.sha1(sets["train"][i]["input_ids"].numpy().tobytes()).hexdigest()
                           for i in range(len(sets["train"]))]
data_args = DataArguments(dataset=folder, seq_len=800, mode="window", streaming=True, shuffle_buffer=8)
_, _, sets = load_data(accelerator, data_args, PoolformerConfig(), args)
seen["held_out"] = [hashlib.sha1(item["input_ids"].numpy().tobytes()).hexdigest() for item in sets["validation"]]
seen["evaluated"] = [hashlib.sha1(row.numpy().tobytes()).hexdigest()  # as nll_bits counts them (padding dropped)
                     for batch in accelerator.prepare(make_loaders(sets, args, accelerator)[1])
                     for row in accelerator.gather_for_metrics(batch["input_ids"])]
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
