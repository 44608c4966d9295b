"""Peak memory of the features stage at two dataset sizes: it must not grow with N.

Generates two synthetic datasets (N and 4N images), runs `transfgu features` on each
in a fresh process and prints the peak RSS of each run, then the ratio. Images are
streamed in batches and written per chunk, so the ratio should stay near 1.

    python benchmarks/bench_features_memory.py [--small 40] [--factor 4]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_features(workdir: Path, n_images: int, size: int) -> tuple[float, float]:
    """Returns (peak RSS in MiB of the features process, seconds)."""
    data = workdir / f"data{n_images}"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"].update({"out": str(data), "n_train": n_images, "n_val": 0, "size": [size, size]})
    params["data"].update({"root": str(data), "eval_split": "train"})
    params["features"]["image_size"] = [size, size]
    params["cache"] = str(workdir / f"cache{n_images}")
    path = workdir / f"params{n_images}.yaml"
    path.write_text(yaml.safe_dump(params))
    for stage in ("synthesize", "prepare"):
        subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--params", str(path)], check=True, cwd=REPO)
    # The stage runs in a child that reports its own peak (ru_maxrss of RUSAGE_SELF, KiB).
    probe = ("import resource, sys; from pipeline.cli import main; "
             "main(['features', '--params', sys.argv[1]], standalone_mode=False); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, str(path)], check=True, cwd=REPO,
                         capture_output=True, text=True).stdout
    seconds = time.perf_counter() - tic
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    return peak / 1024.0, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=40, help="images in the small dataset")
    parser.add_argument("--factor", type=int, default=4, help="the large dataset has factor x small images")
    parser.add_argument("--size", type=int, default=224, help="image side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small_mib, small_s = run_features(Path(tmp), args.small, args.size)
        large_mib, large_s = run_features(Path(tmp), args.small * args.factor, args.size)
    print(f"features_peak_rss_mib n={args.small}: {small_mib:.0f} ({small_s:.1f} s)")
    print(f"features_peak_rss_mib n={args.small * args.factor}: {large_mib:.0f} ({large_s:.1f} s)")
    print(f"peak_rss_ratio={large_mib / small_mib:.3f} for {args.factor}x the images")


if __name__ == "__main__":
    main()
