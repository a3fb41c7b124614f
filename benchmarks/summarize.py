"""Turn a pytest-benchmark JSON into a markdown table of kernel vs reference with ratios.

    python benchmarks/summarize.py gram.json benchmarks/results/gram_cpu.md
"""
import json
import os
import sys
from collections import defaultdict

from _machine import describe


def main(src: str, dst: str) -> None:
    with open(src) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        rows[bench["group"]][bench["extra_info"]["impl"]] = bench["stats"]["median"]
    lines = [f"Machine: {describe()}", "", "| config | kernel (ms) | reference (ms) | reference / kernel |",
             "|---|---:|---:|---:|"]
    for group, r in rows.items():
        if "kernel" in r and "reference" in r:
            lines.append(f"| {group} | {1e3 * r['kernel']:.2f} | {1e3 * r['reference']:.2f} | "
                         f"{r['reference'] / r['kernel']:.2f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(dst, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:3])
