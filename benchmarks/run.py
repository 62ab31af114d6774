"""Runs the benchmark families on the device present and prints one table each:
attnkit vs the PyTorch baseline, measured in the same run on the same inputs.

    python benchmarks/run.py [--full] [--only lstm_cell] [--device cpu|cuda] [--dtype float32] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ["lstm_cell", "attention", "attention_cpu", "positional"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(title: str, rows: list) -> None:
    """One markdown table; optional columns (TFLOP/s, peak memory) appear when the family reports them."""
    print(f"\n## {title}\n")
    if not rows:
        return
    extra = [key for key in ("ours_tflops", "baseline_tflops", "ours_peak_mb", "baseline_peak_mb") if rows and key in rows[0]]
    header = ["case", "shape", "backend", "attnkit ms", "baseline ms", "speedup (>1: attnkit faster)", "max err"]
    print("| " + " | ".join(header + [key.replace("_", " ") for key in extra]) + " |")
    print("|---|---|---|" + "---:|" * (len(header) - 3 + len(extra)))
    for r in rows:
        cells = [r["case"], r["shape"], r["backend"], f"{r['ours_ms']:.3f}", f"{r['baseline_ms']:.3f}",
                 f"{r['baseline_ms'] / r['ours_ms']:.2f}x", f"{r['max_err']:.1e}"]
        cells += [f"{r[key]:.1f}" for key in extra]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="larger shapes (default: quick)")
    parser.add_argument("--only", choices=FAMILIES, action="append", help="run only these families")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--json", help="also write the results here (default: bench-results/<date>.json)")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = machine_info(device)
    print(f"attnkit benchmarks on {info.get('gpu', info['cpu'])}, {args.dtype}, commit {info['commit']}, {info['date']}")
    results = {"machine": info, "dtype": args.dtype, "families": {}}
    for name in args.only or FAMILIES:
        module = importlib.import_module(name)
        rows = module.run(device, dtype, quick=not args.full)
        print_table(module.TITLE, rows)
        results["families"][name] = rows

    path = args.json or os.path.join("bench-results", f"{info['date'][:10]}-{device.type}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
