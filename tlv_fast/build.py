"""Compile the C++ (and, with CUDA, the CUDA) extension now instead of on first use:  python -m tlv_fast.build"""
import sys

import torch

from . import _ext


def main():
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in kinds:
        _ext.load(kind)
        print(f"tlv_fast: {kind} extension ready in {_ext.build_dir(kind)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
