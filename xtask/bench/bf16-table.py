#!/usr/bin/env python3
"""bf16 against full f32 on one model: the PGD-20 results of `rampart eval --suite
pgd20` run twice on the same images, once with `--device cuda` and once with
`--device cuda+bf16`, as a Markdown table (robust accuracy of each attack and the
worst case, the difference in points, bf16 − f32, and the seconds each took).

    bf16-table.py F32_EVAL_DIR BF16_EVAL_DIR > bf16.md

The issue's check: the worst case differs by at most one point. The images robust
under one precision and not the other (from `per_example/pgd.json`) are counted
too: the difference is theirs, and their number says how far it could move.
"""
import json
import os
import sys


def load(folder):
    with open(f"{folder}/results.json") as f:
        return json.load(f)


def robust(folder):
    path = f"{folder}/per_example/pgd.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("robust")


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: bf16-table.py F32_EVAL_DIR BF16_EVAL_DIR")
    f32, bf16 = load(argv[1]), load(argv[2])
    for key in ("robust_examples", "test_examples"):
        if f32.get(key) != bf16.get(key):
            sys.exit(f"the two evaluations differ in {key}: {f32.get(key)} and {bf16.get(key)}")
    n = f32["robust_examples"]
    rows = [("clean", f32["clean_accuracy"], bf16["clean_accuracy"], None, None)]
    by_name = {a["name"]: a for a in bf16.get("attacks", [])}
    for a in f32.get("attacks", []):
        b = by_name.get(a["name"])
        if b is not None:
            rows.append((a["name"], a["robust_accuracy"], b["robust_accuracy"], a["seconds"], b["seconds"]))
    rows.append(("worst case", f32["robust_accuracy"], bf16["robust_accuracy"],
                 f32.get("attack_seconds"), bf16.get("attack_seconds")))
    print(f"# bf16 against f32: `{f32['model']}`, clean on the first {f32['test_examples']} "
          f"test images, PGD-20 on the first {n}\n")
    print("| evaluation | f32 accuracy | bf16 accuracy | bf16 − f32 (points) | f32 s | bf16 s |")
    print("|---|---:|---:|---:|---:|---:|")
    fmt = lambda s: "" if s is None else f"{s:.1f}"
    for name, a, b, sa, sb in rows:
        print(f"| {name} | {100 * a:.2f} % | {100 * b:.2f} % | {100 * (b - a):+.2f} | {fmt(sa)} | {fmt(sb)} |")
    worst = 100 * abs(bf16["robust_accuracy"] - f32["robust_accuracy"])
    verdict = "within" if worst <= 1.0 else "NOT within"
    print(f"\nThe worst case moved by {worst:.2f} points: {verdict} the 1-point target.")
    a, b = robust(argv[1]), robust(argv[2])
    if a is not None and b is not None and len(a) == len(b):
        only_f32 = sum(1 for x, y in zip(a, b) if x and not y)
        only_bf16 = sum(1 for x, y in zip(a, b) if y and not x)
        print(f"Images robust under one precision only: {only_f32 + only_bf16} of {len(a)} "
              f"({only_f32} in f32 only, {only_bf16} in bf16 only).")


if __name__ == "__main__":
    main(sys.argv)
