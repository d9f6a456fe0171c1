"""Measure the linear-weight memory of one transformer block in each quantization mode (JSON, one line per mode).

    python scripts/report_weight_bytes.py [CHECKPOINT_DIR] [--block 0]

Without a checkpoint it makes the benchmark's random-weight ~110M Llama (hidden 768) in a temporary directory.
Each block is measured after one warm-up forward, like a peer's report: on AVX512-BF16 CPUs bitsandbytes repacks nf4
weights (and un-nests their absmax) on that forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from blocks.checkpoint import open_checkpoint  # noqa: E402
from blocks.quantization import QUANT_MODES, nf4_cpu_kernel, weight_bytes_report  # noqa: E402
from blocks.span import load_span  # noqa: E402
from peers.throughput import warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--block", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-weights-") as tmp:
        path = args.checkpoint or make_random_checkpoint(Path(tmp) / "bench-110m", "llama", **PRESETS["bench-110m"])
        ckpt = open_checkpoint(path)
        for mode in QUANT_MODES:
            span = load_span(ckpt, args.block, args.block + 1, torch.float32, quant=mode, progress=False)
            warm_up(span)
            report = weight_bytes_report(span)
            print(
                json.dumps(
                    {
                        "model": Path(path).name,
                        "block": args.block,
                        "quant": mode,
                        "weight_bytes": report["weight_bytes"],
                        "fp16_bytes": report["fp16_bytes"],
                        "ratio_vs_fp16": round(report["ratio_vs_fp16"], 4),
                        "bytes_per_weight": round(report["bytes_per_weight"], 4),
                        "nf4_cpu_kernel": nf4_cpu_kernel(),
                    }
                )
            )


if __name__ == "__main__":
    main()
