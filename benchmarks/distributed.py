"""Training throughput with 1 vs N processes (torch.distributed; gloo on CPU, NCCL on GPUs).

For each (processes, placement) it launches `torch.distributed.run --nproc-per-node N` on this
script in worker mode; every rank trains the same sweep of dictionaries on synthetic activation
batches (random, generated once up front: the reader is not what is measured) and the wall time
of the steps after a warm-up is turned into

    tokens/s           rows of the batch stream consumed per second (each dictionary sees each row)
    dictionary-tokens/s   tokens/s x dictionaries: the work done, comparable across placements

On CPU each rank gets cores // N threads, so 1 vs N processes compares the same hardware
(`--threads 1`: one thread per process, the fairer comparison on a machine other jobs share,
where a multi-threaded process loses most of its time waiting for busy cores).

Each row also gives, for rank 0, the peak memory of the timed steps over what the process held
before training (CUDA: peak allocated; CPU: peak resident set, Linux's VmHWM reset when the timed
steps start): the dictionary's weights, gradients and Adam state, and the step's activations;
and the bytes it handed to collectives per step (tensor sizes as given to all_reduce /
all_gather / gather, over the timed steps). With
`--placement feature_sharded` the data-parallel runs of the same dictionaries come along, for
the bytes data parallelism sends and the memory it needs.

    python benchmarks/distributed.py                      # 1 and 2 processes, both placements
    python benchmarks/distributed.py --nproc 1,2,4 --d-in 576 --d-sae 8192 --dictionaries 4
    python benchmarks/distributed.py --placement feature_sharded --nproc 1,2,4 --dictionaries 1 --d-sae 32768 --batch 512
    python benchmarks/distributed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    import torch

    from sae import distributed
    from sae.dictionaries import parse_dictionary_config
    from sae.trainer import train_dictionaries

    distributed.init_from_env()
    sent = count_collective_bytes()
    nproc = distributed.world_size()
    cores = args.cores or os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores // nproc))
    device = distributed.device_for_rank(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(4)]
    marks: dict[str, float] = {}

    class Source:
        def batches(self, start_step=0):
            for i in range(start_step, args.warmup + args.steps + 1):
                if i == args.warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    marks["start"] = time.perf_counter()
                    marks["sent_start"] = sent[0]
                    reset_peak_memory(device)
                if i == args.warmup + args.steps - 1:  # the timed steps but the last: whole steps between
                    marks["sent_end"] = sent[0]
                    marks["peak"] = peak_memory(device)
                yield {"acts": pool[i % len(pool)]}

    configs = [parse_dictionary_config({"name": f"topk{i}", "architecture": "topk", "k": args.k,
                                        "d_sae": args.d_sae, "seed": i, "hook_name": "acts"})
               for i in range(args.dictionaries)]
    before = memory_now(device)
    train_dictionaries(Source(), configs, total_tokens=(args.warmup + args.steps) * args.batch,
                       device=device, progress=False, placement=args.placement)
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()  # the slowest rank's time
    elapsed = time.perf_counter() - marks["start"]
    peak = marks["peak"] - before
    sent_per_step = (marks["sent_end"] - marks["sent_start"]) / max(args.steps - 1, 1)
    if distributed.is_main():
        tokens = args.steps * args.batch
        Path(args.result).write_text(json.dumps({
            "processes": nproc, "placement": args.placement, "device": str(device.type),
            "threads_per_rank": torch.get_num_threads(), "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed), "dictionary_tokens_per_s": round(tokens * len(configs) / elapsed),
            "peak_memory_mb": round(peak / 2**20, 1), "sent_per_step_mb": round(sent_per_step / 2**20, 3)}))
    distributed.shutdown()


def count_collective_bytes() -> list[int]:
    """[bytes]: a counter of the tensor bytes this process hands to all_reduce, all_gather and gather
    (wrapping torch.distributed's functions, which sae.distributed and sae.sharding call)."""
    import torch.distributed as tdist

    sent = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            tensor = args[1] if fn.__name__ == "all_gather" else args[0]  # (tensor_list, tensor)
            tensor = kwargs.get("tensor", tensor)
            sent[0] += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "all_gather", "gather"):
        setattr(tdist, name, counted(getattr(tdist, name)))
    return sent


def memory_now(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:  # resident pages now
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM starts again from the resident set
            f.write("5")


def peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    ap.add_argument("--placement", default="data_parallel,dictionary_per_rank")
    ap.add_argument("--dictionaries", type=int, default=2)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cores", type=int, default=None, help="CPU cores to share between the ranks")
    ap.add_argument("--threads", type=int, default=None, help="threads per rank (default cores // processes)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    placements = args.placement.split(",")
    if "feature_sharded" in placements and "data_parallel" not in placements:
        placements.append("data_parallel")  # what data parallelism sends and holds, for comparison
    passthrough = ["--dictionaries", args.dictionaries, "--d-in", args.d_in, "--d-sae", args.d_sae, "--k", args.k,
                   "--batch", args.batch, "--steps", args.steps, "--warmup", args.warmup]
    if args.cores:
        passthrough += ["--cores", args.cores]
    if args.threads:
        passthrough += ["--threads", args.threads]
    from sae.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.nproc.split(",")]:
            for placement in placements:
                if n == 1 and placement != placements[0]:
                    continue  # one process: the placements are the same thing
                result = Path(tmp) / f"{n}-{placement}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                       __file__, "--worker", "--placement", placement, "--result", str(result),
                       *map(str, passthrough)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{n} processes, {placement}: failed\n{proc.stderr[-3000:]}")
                row = json.loads(result.read_text())
                if n == 1:
                    row["placement"] = "one process"
                rows.append(row)
                print(f"{n} process{'es' * (n > 1)} {row['placement']:>20}: {row['tokens_per_s']:>10,} tokens/s "
                      f"{row['dictionary_tokens_per_s']:>11,} dictionary-tokens/s, rank 0: peak +"
                      f"{row['peak_memory_mb']:,.0f} MB, sends {row['sent_per_step_mb']:,.2f} MB/step "
                      f"({row['device']}, {row['threads_per_rank']} threads/rank)", flush=True)
    base = rows[0]["dictionary_tokens_per_s"]
    for row in rows:
        row["speedup_vs_one_process"] = round(row["dictionary_tokens_per_s"] / base, 2)
    print("speed-up over one process: " + ", ".join(
        f"{r['processes']}x {r['placement']}: {r['speedup_vs_one_process']}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                          if k not in ("worker", "result", "json")},
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    main()
