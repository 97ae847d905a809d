"""Command line: ``python -m tcpade demo [--steps N ...]``."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m tcpade demo [--help]\n\n  demo   full computation vs tcpade's presets on a trained model shipped with tcpade")
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m tcpade demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
