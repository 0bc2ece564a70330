"""The argument parser of the command-line tools: a usage error is one line, exit status 2."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors print ``<name>: error: <message>`` alone (no
    usage block), so that every error of a tool, from the parser or from the run, reads the
    same way."""

    def __init__(self, *args, error_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_name = error_name

    def error(self, message: str):
        sys.stderr.write(f"{self.error_name}: error: {message} (see --help)\n")
        sys.exit(2)
