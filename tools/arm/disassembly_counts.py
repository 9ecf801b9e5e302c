"""Per-kernel counts of vector (NEON) and scalar floating-point instructions in an aarch64
disassembly of the native kernels (``objdump -d -C --no-show-raw-insn``); tools/arm/disassembly.sh
runs it.

A kernel is every function whose name starts in it: the template itself, its lambdas and the
OpenMP bodies ``at::parallel_for`` outlines. Besides the totals, each kernel's innermost loops
(a backward branch and the code back to its target) that do floating-point work are listed
with their own counts: where the loops that do the work are, and whether they run vectors.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import defaultdict

# the float instantiations of the kernels with hot loops (the x86 SIMD paths' kernels)
KERNELS = [
    "patch_sum_kernel<float>",
    "tiny_patch_sum_kernel<float>",
    "patch_sum_nhwc<float>",
    "unpool_kernel<float>",
    "masked_clamp_kernel<float>",
    "mask_apply_kernel<float>",
    "bn_act_stats_kernel<float>",
    "unit_backward_kernel<float, unsigned char>",
    "unit_backward_kernel<float, float>",
]

FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")
INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
VEC_REG = re.compile(r"\bv\d+\.\d+[bhsd]\b")  # a vector register with its lane arrangement
Q_REG = re.compile(r"\bq\d+\b")  # a whole 128-bit register (ldr/str/ldp/stp q)
FP_REG = re.compile(r"\b[hsd]\d+\b")
BRANCH = re.compile(r"^(b|b\.\w+|cbn?z|tbn?z)$")
TARGET = re.compile(r"\b([0-9a-f]+) <")


CODES = {"f": "float", "d": "double", "h": "unsigned char"}


def enclosing_kernel(mangled: str) -> str | None:
    """The first function of the anonymous namespace in a mangled name, with its template
    arguments where they are plain types: what c++filt cannot demangle (OpenMP bodies of
    lambdas, ``_Z…._omp_fn.0``) still says whose loop it is."""
    m = re.search(r"_GLOBAL__N_1(\d+)", mangled)
    if not m:
        return None
    start = m.end()
    name = mangled[start:start + int(m.group(1))]
    rest = mangled[start + int(m.group(1)):]
    t = re.match(r"I([a-z]+)E", rest)
    if t and all(c in CODES for c in t.group(1)):
        name += "<" + ", ".join(CODES[c] for c in t.group(1)) + ">"
    elif rest.startswith("I"):
        name += "<...>"
    return f"(anonymous namespace)::{name}("


def demangle(names: list[str]) -> dict[str, str]:
    """Names objdump left mangled (OpenMP bodies: ``_Z…._omp_fn.0``), demangled without the
    suffix by c++filt where it can, else reduced to their enclosing kernel."""
    raw = [n for n in names if n.startswith("_Z")]
    if not raw:
        return {}
    stems = [n.split(".", 1)[0] for n in raw]
    out = stems
    try:
        out = subprocess.run(["c++filt"], input="\n".join(stems), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: (d if not d.startswith("_Z") else enclosing_kernel(d) or d)
            for n, d in zip(raw, out)}


def classify(mnemonic: str, operands: str) -> str | None:
    """'vfp' vector floating point, 'vec' other vector (loads, stores, logic, integer),
    'sfp' scalar floating point, None otherwise."""
    fp = mnemonic.startswith("f") or mnemonic in ("scvtf", "ucvtf")
    if VEC_REG.search(operands) or (Q_REG.search(operands) and mnemonic.startswith(("ld", "st"))):
        return "vfp" if fp else "vec"
    if fp and FP_REG.search(operands):
        return "sfp"
    return None


def kernel_of(name: str) -> str | None:
    for k in KERNELS:
        if re.search(r"(^|[ :])" + re.escape(k) + r"(\(|::|$)", name):
            return k
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("disassembly")
    ap.add_argument("--full", help="also write the counted functions' disassembly here")
    ap.add_argument("--show", type=int, default=1,
                    help="print the body of this many loops per kernel, most vector FP first")
    args = ap.parse_args()

    funcs: list[tuple[str, list[tuple[int, str, str]]]] = []
    with open(args.disassembly) as f:
        for line in f:
            line = line.rstrip("\n")
            m = FUNC.match(line)
            if m:
                funcs.append((m.group(1), []))
                continue
            m = INSN.match(line)
            if m and funcs:
                funcs[-1][1].append((int(m.group(1), 16), m.group(2), m.group(3)))
    names = demangle([n for n, _ in funcs])

    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    loops: dict[str, list[tuple[int, int, dict[str, int]]]] = defaultdict(list)
    full = open(args.full, "w") if args.full else None
    for name, insns in funcs:
        kernel = kernel_of(names.get(name, name))
        if kernel is None:
            continue
        if full:
            print(f"\n<{names.get(name, name)}>:", file=full)
        kinds = []
        for addr, mn, ops in insns:
            kind = classify(mn, ops)
            kinds.append(kind)
            totals[kernel]["insns"] += 1
            if kind:
                totals[kernel][kind] += 1
            if full:
                print(f"  {addr:6x}: {mn:8s} {ops}", file=full)
        # loops: backward branches within the function; innermost = contains no other loop
        index = {addr: i for i, (addr, _, _) in enumerate(insns)}
        spans = []
        for i, (addr, mn, ops) in enumerate(insns):
            t = TARGET.search(ops)
            target = int(t.group(1), 16) if t else None
            if BRANCH.match(mn) and target is not None and target <= addr and target in index:
                spans.append((index[target], i))
        for a, b in spans:
            if any((a <= c and d <= b) and (c, d) != (a, b) for c, d in spans):
                continue
            counts: dict[str, int] = defaultdict(int)
            for k in kinds[a:b + 1]:
                if k:
                    counts[k] += 1
            if counts["vfp"] or counts["sfp"] or counts["vec"]:
                body = [f"{addr:8x}: {mn:8s} {ops.split(' <', 1)[0]}"  # branches: no symbol
                        for addr, mn, ops in insns[a:b + 1]]
                loops[kernel].append((insns[a][0], b - a + 1, counts, body))
    if full:
        full.close()

    print(f"{'kernel (all its functions)':44s} {'insns':>6s} {'vec FP':>7s} {'vec other':>9s} "
          f"{'scalar FP':>9s}")
    for k in KERNELS:
        t = totals.get(k)
        if not t:
            print(f"{k:44s} (not in this object)")
            continue
        print(f"{k:44s} {t['insns']:6d} {t['vfp']:7d} {t['vec']:9d} {t['sfp']:9d}")
    print("\ninnermost loops with vector or floating-point work (start, instructions: vector FP "
          "/ other vector / scalar FP)")
    for k in KERNELS:
        if not loops.get(k):
            continue
        vec = sum(1 for *_, c, _ in loops[k] if c["vfp"] or c["vec"])
        print(f"{k}: {len(loops[k])} loops, {vec} with vector instructions")
        for start, n, c, _ in sorted(loops[k], key=lambda loop: loop[0]):
            print(f"    {start:#8x} {n:4d} insns: {c['vfp']:3d} / {c['vec']:3d} / {c['sfp']:3d}")
    if args.show:
        print(f"\nper kernel, the {args.show} loop(s) with the most vector FP instructions")
        for k in KERNELS:
            ranked = sorted(loops.get(k, []), key=lambda loop: (-loop[2]["vfp"], loop[0]))
            for start, _, c, body in ranked[:args.show]:
                if not c["vfp"]:
                    continue
                print(f"\n{k}, loop at {start:#x}:")
                print("\n".join("    " + line for line in body))


if __name__ == "__main__":
    main()
