"""Entry point: `python cli.py export|fold-bn|verify|inspect|deploy|models …`."""

import sys

from normdeploy.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
