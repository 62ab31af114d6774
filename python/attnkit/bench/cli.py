"""python -m attnkit.bench [--quick | --full] [--only FAMILY]... [--device cpu|cuda[:N]]
                          [--dtype float32] [--json FILE] [--out DIR] [--no-plots]

Runs the benchmark families on the device present and prints one table each:
attnkit against its PyTorch baseline, measured in the same process on the same
inputs after warm-up (median of repeats, CUDA-synchronized). Writes the results
as JSON (with machine information) and PNG plots to bench-results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import core, report


def parse_device(text: str) -> torch.device:
    valid = "cpu" + (", cuda" + "".join(f", cuda:{i}" for i in range(torch.cuda.device_count()))
                     if torch.cuda.is_available() else " (no CUDA GPU is visible, so cuda is not)")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid here: {valid}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda" or not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available; valid here: {valid}")
    return device


def build_parser(families: list) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", help="small shapes, a few minutes (default)")
    size.add_argument("--full", dest="full", action="store_true", help="every shape the families define")
    parser.set_defaults(full=False)  # the store_false action above would otherwise default it to True
    parser.add_argument("--only", action="append", choices=families, metavar="FAMILY",
                        help=f"run only this family (repeatable); one of: {', '.join(families)}")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--dtype", default="float32", choices=core.DTYPES, help="input dtype (default float32)")
    parser.add_argument("--json", metavar="FILE", help="results file (default: <out>/<date>-<device>[-<dtype>][-<families>].json)")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="plots and default JSON (bench-results/)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return parser


def main(argv=None) -> int:
    families = core.families()
    parser = build_parser(families)
    args = parser.parse_args(argv)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    names = list(dict.fromkeys(args.only or families))
    info = core.machine_info(device)
    # Named by what ran: a second run of another dtype or family the same day must not overwrite the first
    dtype_tag = dtype_suffix(args.dtype)
    only_tag = "-" + "-".join(names) if args.only else ""
    path = args.json or os.path.join(args.out, f"{info['date'][:10]}-{device.type}{dtype_tag}{only_tag}.json")
    # Checked before the families run: a bad path found at the end would lose their results.
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --json: cannot create the folder of {path!r}: {error.strerror or error}")
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else folder, os.W_OK):
        parser.error(f"argument --json: cannot write {path!r} ({'a folder' if os.path.isdir(path) else 'no permission'})")
    if not args.no_plots:  # the plots' folder too, before the families run
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as error:
            parser.error(f"argument --out: cannot create {args.out!r}: {error.strerror or error}")
        if not os.access(args.out, os.W_OK):
            parser.error(f"argument --out: cannot write into {args.out!r} (no permission)")
    mode = "full" if args.full else "quick"
    print(f"attnkit benchmarks ({mode}, {device}, {args.dtype}) on {core.describe_machine(info)}", flush=True)

    started = time.perf_counter()
    progress = core.Progress(names, enabled=not args.no_progress)
    results = {}
    try:
        for name in names:
            results[name] = core.run_family(name, device, dtype, quick=not args.full, progress=progress)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started

    for name, result in results.items():
        print("\n" + report.format_family(name, result), flush=True)
    failed = [name for name, result in results.items() if result["error"]]
    for name in failed:
        print(f"{name} failed:\n{results[name]['traceback']}", file=sys.stderr)
    differing = report.differing_rows(results)
    if differing:
        print(f"\nWARNING: {len(differing)} rows (max err marked (!)) compare different results, not the same "
              f"work:\n  " + "\n  ".join(differing), flush=True)

    document = {"schema": 1, "machine": info, "device": str(device), "dtype": args.dtype, "mode": mode,
                "seconds": round(elapsed, 2), "families": results}
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    print(f"\nwrote {path}")
    if not args.no_plots:
        write_plots(results, args.out, f"{info['gpu'] or info['cpu']}, {args.dtype}", dtype_tag)
    print(f"{len(names)} families in {elapsed:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def dtype_suffix(dtype: str) -> str:
    """What the results' file names carry for `dtype` (none for float32)."""
    return "" if dtype == "float32" else f"-{dtype}"


def write_plots(results: dict, out_dir: str, device_label: str, suffix: str = "") -> list:
    """<out_dir>/<family><suffix>-time.png (and -memory.png) per family with rows."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'attnkit[bench]')")
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, result in results.items():
        if result["rows"]:
            paths += report.plot_family(name + suffix, result, out_dir, device_label)
    if paths:
        print("wrote " + ", ".join(paths))
    return paths
