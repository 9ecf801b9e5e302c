"""Print docs/performance.md's compiled-training table from a `bench step --compile` result.

    .venv/bin/gradfilter bench step --compile --repeats 9 \
        --out benchmarks/results/step_cpu_compiled.json
    .venv/bin/python benchmarks/reproduce/compile_table.py benchmarks/results/step_cpu_compiled.json
"""

from __future__ import annotations

import json
import sys

from gradfilter.machine import describe


def _cell(row: dict, m: str) -> str:
    e = row.get(f"efficiency_{m}")
    return (f"{row[f'step_ms_{m}']:.0f} ({row[f'speedup_{m}']:.2f}×, "
            f"E {'–' if e is None else f'{100 * e:.0f}%'})")


def table(result: dict) -> str:
    methods = [m for m in result.get("methods", ["vanilla", "filtered", "lean", "fused"])
               if m != "vanilla"]
    head = ("| model | last N | eager vanilla | eager " + " | eager ".join(methods)
            + " | compiled fwd-only | compiled vanilla | compiled "
            + " | compiled ".join(methods) + " | compiled E bound | fastest |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in result["rows"]:
        steps = {k.removeprefix("step_ms_"): v for k, v in row.items()
                 if k.startswith("step_ms_")}
        fastest = min(steps, key=steps.get).replace("_compiled", " (compiled)")
        bound = row.get("efficiency_bound_compiled")
        cells = [row["model"], str(row["last"]), f"{row['step_ms_vanilla']:.0f}",
                 *(_cell(row, m) for m in methods),
                 f"{row['forward_only_compiled_ms']:.0f}",
                 f"{row['step_ms_vanilla_compiled']:.0f}",
                 *(_cell(row, f"{m}_compiled") for m in methods),
                 "–" if bound is None else f"{100 * bound:.0f}%", fastest]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    result = json.loads(open(path).read())
    print(f"Machine: {describe(result['machine'])}; batch {result['batch']}, "
          f"{result['image_size']}², r={result['radius']}, median of {result['repeats']}.\n")
    print(table(result))


if __name__ == "__main__":
    main(sys.argv[1])
