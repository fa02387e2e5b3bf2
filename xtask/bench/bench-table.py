#!/usr/bin/env python3
"""The Markdown tables of gpu-suite.sh's benchmark logs.

    python3 bench-table.py bench.jsonl > bench.md
    python3 bench-table.py --ab ab.jsonl > ab.md

bench.jsonl: for each architecture, batch size, device string and step, the median
images/s over the rounds of Rampart and of PyTorch, their ratio (Rampart ÷ PyTorch
images/s: > 1 means Rampart is faster), and each one's peak GPU memory (the largest
over the rounds).

ab.jsonl (`--ab`): Rampart alone under each setting (an environment variable, or
`default`), alternating over the rounds: for each architecture, step and setting,
the path the step took (`fused` or `layers`; `device`, `device+graphs` or `host` for
an attack step; from `rampart bench`), the median images/s and its ratio to the
default's (setting ÷ default images/s: > 1 means the setting is faster), the peak GPU
memory, and the host's share of the step's time (`host_share`: the time until the
step's code returned ÷ the time until the GPU finished it; near 1 the host is the
bottleneck, well below 1 the GPU is), median over the rounds.

bench.jsonl's table has Rampart's and PyTorch's host shares too (`pytorch_bench.py`
reports it the same way).

Each `{"run": {...}}` line names the framework (or setting), architecture, batch
size and device of the measurement lines that follow it, up to the next such line.
"""
import json
import statistics
import sys
from collections import defaultdict


def measurements(path, label, keep=lambda run: True):
    """Images/s, peak bytes and the GPU paths seen (`fused`, `layers`, `device`, `host`) per (arch,
    batch, device, step, run[label]) of the measurement lines whose run passes
    `keep`."""
    speed = defaultdict(list)
    memory = defaultdict(list)
    paths = defaultdict(set)
    shares = defaultdict(list)
    run = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "run" in value:
                run = value["run"]
                continue
            if run is None or not keep(run) or "images_per_second" not in value:
                continue
            key = (run["arch"], run["batch_size"], run["device"], value["step"], run[label])
            speed[key].append(value["images_per_second"])
            if value.get("peak_memory_bytes") is not None:
                memory[key].append(value["peak_memory_bytes"])
            if value.get("path"):
                paths[key].add(value["path"])
            if value.get("host_share") is not None:
                shares[key].append(value["host_share"])
    return speed, memory, paths, shares


def ab_table(path):
    speed, memory, paths, shares = measurements(path, "setting")
    print("| arch | batch | device | step | setting | path | img/s | ratio (setting ÷ default) | peak MiB | host share | rounds |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|---:|")
    for key in sorted(speed):
        arch, batch, device, step, setting = key
        a = statistics.median(speed[key])
        base = speed.get((arch, batch, device, step, "default"))
        ratio = f"{a / statistics.median(base):.2f}" if base else "-"
        mib = f"{max(memory[key]) / 2**20:.0f}" if memory.get(key) else "-"
        seen = "/".join(sorted(paths.get(key, ()))) or "-"
        print(f"| {arch} | {batch} | {device} | {step} | {setting} | {seen} | {a:,.0f} | {ratio} | {mib} | {share(shares, key)} | {len(speed[key])} |")


def share(shares, key):
    """The median host share of `key`'s measurements, or `-`."""
    return f"{statistics.median(shares[key]):.2f}" if shares.get(key) else "-"


def main(path):
    # Only the comparison's runs (the estimates' extra Rampart runs are marked with
    # another framework name).
    speed, memory, _, shares = measurements(
        path, "framework", lambda run: run.get("framework") in ("rampart", "pytorch")
    )
    rows = sorted({k[:4] for k in speed})
    print("| arch | batch | device | step | Rampart img/s | PyTorch img/s | ratio (Rampart ÷ PyTorch) | Rampart peak MiB | PyTorch peak MiB | Rampart host share | PyTorch host share | rounds |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = lambda key: f"{max(memory[key]) / 2**20:.0f}" if memory.get(key) else "-"
    for row in rows:
        ours, theirs = row + ("rampart",), row + ("pytorch",)
        a = statistics.median(speed[ours]) if speed.get(ours) else None
        b = statistics.median(speed[theirs]) if speed.get(theirs) else None
        ratio = f"{a / b:.2f}" if a and b else "-"
        fmt = lambda v: f"{v:,.0f}" if v else "-"
        rounds = min(len(speed.get(ours, [])), len(speed.get(theirs, [])))
        arch, batch, device, step = row
        print(f"| {arch} | {batch} | {device} | {step} | {fmt(a)} | {fmt(b)} | {ratio} | {mib(ours)} | {mib(theirs)} | {share(shares, ours)} | {share(shares, theirs)} | {rounds} |")
    # The opt-in GPU paths Rampart's runs took (gpu-suite.sh: those whose tests passed).
    switches = {}
    with open(path) as f:
        for line in f:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            run = value.get("run") if isinstance(value, dict) else None
            if run and run.get("framework") == "rampart":
                switches.setdefault(run["device"], set()).add(run.get("switches") or "none")
    for device, taken in sorted(switches.items()):
        print(f"\nRampart's runs on {device} took: {'; '.join(sorted(taken))}.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--ab":
        ab_table(sys.argv[2])
    else:
        main(sys.argv[1])
