#!/usr/bin/env python3
"""The Markdown table of gpu-suite.sh's A/B runs (ab.jsonl): Rampart alone, one
architecture at a time, under each setting (an environment variable, or `default`),
alternating over the rounds. For each architecture, step and setting: the median
images/s over the rounds and its ratio to the default's (setting ÷ default images/s:
> 1 means the setting is faster), and the peak GPU memory.

Each `{"run": {...}}` line names the setting, architecture, batch size and device of
the measurement lines that follow it, up to the next such line.

    python3 ab-table.py ab.jsonl > ab.md
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
            if run is None or "images_per_second" not in value:
                continue
            key = (run["arch"], run["batch_size"], run["device"], value["step"], run["setting"])
            speed[key].append(value["images_per_second"])
            if value.get("peak_memory_bytes") is not None:
                memory[key].append(value["peak_memory_bytes"])
    print("| arch | batch | device | step | setting | img/s | ratio (setting ÷ default) | peak MiB | rounds |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|")
    for key in sorted(speed):
        arch, batch, device, step, setting = key
        a = statistics.median(speed[key])
        base = speed.get((arch, batch, device, step, "default"))
        ratio = f"{a / statistics.median(base):.2f}" if base else "-"
        mib = f"{max(memory[key]) / 2**20:.0f}" if memory.get(key) else "-"
        print(f"| {arch} | {batch} | {device} | {step} | {setting} | {a:,.0f} | {ratio} | {mib} | {len(speed[key])} |")


if __name__ == "__main__":
    main(sys.argv[1])
