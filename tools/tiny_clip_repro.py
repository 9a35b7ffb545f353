#!/usr/bin/env python
"""Build the tiny CLIP (a short version of the recipe by default) under several numeric
environments this machine can produce and print the sha256 of each checkpoint.

    python tools/tiny_clip_repro.py                         # 4 steps on 100 images, every variant
    python tools/tiny_clip_repro.py --full --variants pinned pinned-avx512-host

"pinned*" variants run the build as the embedded default does (`build_pinned`: AVX2 kernels,
MKL_CBWR=AVX2,STRICT, no oneDNN, 2 threads) with the host environment changed in ways a
different machine would change it (a CPU without AVX-512 for MKL/oneDNN, one core, other
thread settings in the calling shell); they must all print the same hash. "free*" variants
drop the pinning (what the build did before): their hashes show which dispatch changes the bytes.
"""
import argparse
import logging
import os
import sys
import tempfile

from clcl_det.engine.defaults import setup_cfg
from clcl_det.utils.errors import run_cli
from clcl_det.utils.logger import setup_logger

SHORT = ["DATASETS.SHAPES.NUM_TRAIN", "100", "DATASETS.SHAPES.NUM_TEST", "10", "MODEL.CLIP.TINY.ITERS", "4", "MODEL.CLIP.TINY.BATCH_SIZE", "4", "MODEL.CLIP.TINY.CROP_BATCH_SIZE", "4",
         "MODEL.CLIP.TINY.TEXT_WARMUP_ITERS", "2", "MODEL.CLIP.TINY.WARMUP_ITERS", "2"]


def variants():
    from clcl_det.embedded.tiny_clip import pinned_env

    free = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    free.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    pinned = pinned_env()
    return {
        # name: (environment of the build process, command prefix)
        "pinned": (pinned, []),
        "pinned-mkl-avx2-only": ({**pinned, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, []),
        "pinned-mkl-avx512-host": ({**pinned, "MKL_ENABLE_INSTRUCTIONS": "AVX512"}, []),
        "pinned-one-core": (pinned, ["taskset", "-c", "0"]),
        "pinned-mkl-sequential-hint": ({**pinned, "MKL_THREADING_LAYER": "SEQUENTIAL"}, []),
        "free-default": (free, []),
        "free-aten-avx2": ({**free, "ATEN_CPU_CAPABILITY": "avx2"}, []),
        "free-mkl-cbwr-avx512": ({**free, "MKL_CBWR": "AVX512"}, []),
        "free-1-thread": ({**free, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, []),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole recipe instead of 4 steps")
    p.add_argument("--variants", nargs="*", default=None, help="names of the variants to run (default: all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    args = p.parse_args(argv)
    setup_logger(name="clcl_det")
    logging.getLogger("clcl_det").setLevel(logging.WARNING)
    cfg = setup_cfg("", ([] if args.full else SHORT) + list(args.opts))
    from clcl_det.embedded.shapes import ShapesSpec, ensure_shapes
    from clcl_det.embedded.tiny_clip import build_pinned, file_sha256

    ensure_shapes(ShapesSpec.from_cfg(cfg))
    table = variants()
    names = args.variants or list(table)
    with tempfile.TemporaryDirectory(prefix="tiny_clip_repro_") as tmp:
        for name in names:
            env, prefix = table[name]
            out = os.path.join(tmp, f"{name}.pt")
            build_pinned(cfg, out, env=dict(env), prefix=prefix)
            print(f"{name:28s} {file_sha256(out)}", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
