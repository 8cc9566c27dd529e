"""One torchrun worker of tests/test_parallel.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py SPEC.json

Loads the model directory with transformers' tensor parallelism (``tp_plan="auto"``, gloo on
the CPU), generates with a LeanK cache built from the mask, and saves (rank 0) the step logits,
tokens and the byte counts summed over the processes; every rank saves its own byte counts.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import leank
from leank.cache import cache_kwargs
from leank.parallel import sum_over_ranks


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    model = AutoModelForCausalLM.from_pretrained(spec["model"], tp_plan="auto", dtype=torch.float32)
    leank.enable(model)
    rank = torch.distributed.get_rank()
    mask = leank.ChannelMask.load(spec["mask"])
    ids, attention = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
    cache = leank.LeanKCache(model, mask, sink=spec["sink"], recent=spec["recent"], max_length=spec.get("max_length"))
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=spec["new"], do_sample=False,
                         output_logits=True, return_dict_in_generate=True, disable_compile=True,
                         **cache_kwargs(cache))
    mine = {"nbytes": cache.nbytes(), "ideal": cache.ideal_nbytes(), "dense": cache.dense_nbytes(),
            "kept_rows": [layer.kept.shape[0] for layer in cache.layers]}
    summed = {key: sum_over_ranks(mine[key]) for key in ("nbytes", "ideal", "dense")}
    torch.save(mine, f"{spec['dump']}/rank{rank}.pt")
    if rank == 0:
        torch.save({"sequences": out.sequences, "logits": torch.stack(out.logits, 1), **summed},
                   f"{spec['dump']}/result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
