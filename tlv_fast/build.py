"""Compile the C++ (and, with CUDA, the CUDA) extension now instead of on first use:  python -m tlv_fast.build

Exit status 0 when every extension is ready (built now, or already verified in the cache), 1 otherwise, with the
reason on stderr (no compiler, a cache folder that cannot be written, a compile error)."""
import sys

import torch

from . import _ext


def main(argv=None):
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = 0
    for kind in kinds:
        directory = _ext.build_dir(kind)
        cached = _ext.verified(directory, kind)
        try:
            _ext.load(kind)
        except _ext.BuildError as e:
            print(f"tlv_fast.build: the {kind} extension is not ready: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"tlv_fast: {kind} extension ready in {directory}" + (" (already built)" if cached else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
