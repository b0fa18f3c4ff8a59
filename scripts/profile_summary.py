#!/usr/bin/env python3
"""Where the GPU time of a profiled run goes: reads the Chrome trace that `lorafit bench
--profile FILE` (or torch.profiler's export_chrome_trace) writes and prints GPU kernel time
grouped by kernel and by the innermost ATen op that launched it, against the wall time, and
the time the GPU sat idle, by the op whose kernel it was waiting for.

usage: profile_summary.py TRACE.json [--steps N] [--top K]
"""
import argparse
import collections
import json


def kernel_class(name):
    low = name.lower()
    if any(k in low for k in ("fmha", "flash", "cudnn", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_")):
        return "GEMM"
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="steps in the trace, to print per step")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    with open(a.trace) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        raise SystemExit(f"{a.trace}: no GPU kernels in the trace")

    # Innermost CPU op around each launch, found by sweeping each thread's nested intervals.
    launcher = {}
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            by_tid[(e["pid"], e["tid"])].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < e["ts"]:
                stack.pop()
            if e["cat"] == "cpu_op":
                stack.append(e)
            else:
                corr = e.get("args", {}).get("correlation")
                if corr is not None:
                    launcher[corr] = stack[-1]["name"] if stack else "(no op)"

    by_kernel = collections.Counter()
    by_op = collections.Counter()
    launches = collections.Counter()
    for k in kernels:
        name = k["name"]
        by_kernel[name[:110]] += k["dur"]
        by_op[launcher.get(k.get("args", {}).get("correlation"), "(unknown)")] += k["dur"]
        launches[name[:110]] += 1
    busy = sum(k["dur"] for k in kernels)
    start = min(k["ts"] for k in kernels)
    end = max(k["ts"] + k["dur"] for k in kernels)
    wall = end - start
    n = a.steps
    print(f"GPU kernel time {busy / 1e3 / n:.1f} ms/step over a span of {wall / 1e3 / n:.1f} "
          f"ms/step ({100 * busy / wall:.0f}% busy); {len(kernels) // n} kernels/step")

    def table(title, counter):
        print(f"\n{title:<112} ms/step     %")
        for name, us in counter.most_common(a.top):
            print(f"{name:<112} {us / 1e3 / n:7.2f} {100 * us / busy:5.1f}")

    by_class = collections.Counter()
    for name, us in by_kernel.items():
        by_class[kernel_class(name)] += us
    table("by class (GEMM, attention, the rest)", by_class)
    table("by ATen op", by_op)
    table("by kernel", by_kernel)

    # Idle time: the gaps in the union of all streams' kernels, each charged to the op that
    # launched the kernel ending it (what the GPU waited for: a host sync, a slow launch).
    idle = collections.Counter()
    gaps = collections.Counter()
    reach = start
    for k in sorted(kernels, key=lambda k: k["ts"]):
        if k["ts"] > reach:
            op = launcher.get(k.get("args", {}).get("correlation"), "(unknown)")
            idle[op] += k["ts"] - reach
            gaps[op] += 1
        reach = max(reach, k["ts"] + k["dur"])
    total_idle = sum(idle.values())
    print(f"\nidle {total_idle / 1e3 / n:.1f} ms/step in {sum(gaps.values()) // n} gaps/step; "
          f"by the op launching the kernel after the gap")
    for name, us in idle.most_common(a.top):
        print(f"{name:<100} {gaps[name] / n:8.1f} gaps {us / 1e3 / n:7.2f} ms/step")


if __name__ == "__main__":
    main()
