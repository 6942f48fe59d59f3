"""The `tlv-fast` command: one entry point for the package's tools.

    tlv-fast stereo infer|eval|train ...   STTR on your images and datasets (python -m tlv_fast.stereo)
    tlv-fast demo stereo ...               train a small STTR on synthetic pairs (python -m tlv_fast.demo)
    tlv-fast build                         compile the C++/CUDA extensions now (python -m tlv_fast.build)
"""
import sys

COMMANDS = {"stereo": "tlv_fast.stereo.cli", "demo": "tlv_fast.demo", "build": "tlv_fast.build"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"tlv-fast: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib
    status = importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
