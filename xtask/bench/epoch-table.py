#!/usr/bin/env python3
"""An epoch's wall time against its steps: for each fast-AT epoch run of the GPU
suite (OUT/fast-at-epoch*/history.jsonl), every epoch's `epoch_seconds` over its
number of steps × the step time `rampart bench --steps fast-at-step` measured with the
same device and switches right after it (OUT/epoch-steps.jsonl: a `{"run": …}` line
naming the run's folder, then the bench's JSON line), as a Markdown table.

    epoch-table.py OUT > epoch.md

A ratio of 1 means the epoch took exactly its steps' time: what the input pipeline
(loading, augmenting and copying batches), the reads of the running loss and the
progress bars add is the excess (the issue's target: at most 10 %). The first epoch
also pays once for compiling kernels and choosing cuDNN's plans; the last is the
steady state.
"""
import json
import os
import sys


def runs(out):
    """(folder, device, switches, seconds per step, batch size) per run of the file."""
    path = os.path.join(out, "epoch-steps.jsonl")
    if not os.path.exists(path):
        return []
    found, current = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "run" in record:
                current = record["run"]
            elif record.get("step") == "fast-at-step" and current is not None:
                found.append(
                    (
                        current["epoch_dir"],
                        current.get("device", record.get("device", "")),
                        current.get("switches", ""),
                        record["seconds_per_batch"],
                        record["batch_size"],
                        record.get("path"),
                    )
                )
                current = None
    return found


def history(out, folder):
    path = os.path.join(out, folder, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: epoch-table.py OUT")
    out = argv[1]
    rows = []
    for folder, device, switches, step, batch, path in runs(out):
        for r in history(out, folder):
            steps = round(r["images_per_second"] * r["epoch_seconds"] / batch)
            expected = steps * step
            wait = r.get("data_wait_seconds")
            rows.append(
                f"| {folder} | {device} | {switches or 'default'} | {path or '-'} | "
                f"{r['epoch']} | {r['epoch_seconds']:.2f} | {steps} | {step * 1000:.2f} | "
                f"{expected:.2f} | **{r['epoch_seconds'] / expected:.3f}** | "
                f"{'-' if wait is None else f'{wait:.2f}'} |"
            )
    if not rows:
        print("No fast-AT epoch with a measured step time (no data folder, or the runs failed).")
        return
    print("| run | device | switches | step's path | epoch | epoch s | steps | "
          "step ms (bench) | steps × step s | epoch ÷ (steps × step) | loader wait s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)
    print("\nepoch ÷ (steps × step): the epoch's wall time (history.jsonl, training steps "
          "only) over its steps × the median step time of `rampart bench --steps "
          "fast-at-step` with the same device and switches; 1 means no time outside the "
          "steps, the target is at most 1.10. The first epoch also compiles kernels and "
          "chooses cuDNN's plans. Loader wait: of the epoch's time, how long the loop "
          "waited for the loader's next batch (history.jsonl's data_wait_seconds).")


if __name__ == "__main__":
    main(sys.argv)
