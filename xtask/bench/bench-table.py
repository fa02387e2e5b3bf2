#!/usr/bin/env python3
"""The Markdown table of a gpu-suite.sh benchmark log (bench.jsonl): for each
architecture, batch size, device string and step, the median images/s over the
rounds of Rampart and of PyTorch, their ratio (Rampart ÷ PyTorch images/s: > 1 means
Rampart is faster), and each one's peak GPU memory (the largest over the rounds).

Each `{"run": {...}}` line names the framework, architecture, batch size and device
of the measurement lines that follow it, up to the next such line.

    python3 bench-table.py bench.jsonl > bench.md
"""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    speed = defaultdict(list)
    memory = defaultdict(list)
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
            # Only the comparison's runs (the estimates' extra Rampart runs are marked
            # with another framework name).
            if run is None or run["framework"] not in ("rampart", "pytorch"):
                continue
            if "images_per_second" not in value:
                continue
            key = (run["arch"], run["batch_size"], run["device"], value["step"], run["framework"])
            speed[key].append(value["images_per_second"])
            if value.get("peak_memory_bytes") is not None:
                memory[key].append(value["peak_memory_bytes"])
    rows = sorted({k[:4] for k in speed})
    print("| arch | batch | device | step | Rampart img/s | PyTorch img/s | ratio (Rampart ÷ PyTorch) | Rampart peak MiB | PyTorch peak MiB | rounds |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    mib = lambda key: f"{max(memory[key]) / 2**20:.0f}" if memory.get(key) else "-"
    for row in rows:
        ours, theirs = row + ("rampart",), row + ("pytorch",)
        a = statistics.median(speed[ours]) if speed.get(ours) else None
        b = statistics.median(speed[theirs]) if speed.get(theirs) else None
        ratio = f"{a / b:.2f}" if a and b else "-"
        fmt = lambda v: f"{v:,.0f}" if v else "-"
        rounds = min(len(speed.get(ours, [])), len(speed.get(theirs, [])))
        arch, batch, device, step = row
        print(f"| {arch} | {batch} | {device} | {step} | {fmt(a)} | {fmt(b)} | {ratio} | {mib(ours)} | {mib(theirs)} | {rounds} |")


if __name__ == "__main__":
    main(sys.argv[1])
