"""``python -m unsee.apps``: the Gradio demo, with the options of ``unsee demo`` (``python -m unsee.apps --help``)."""

import sys

from unsee.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
