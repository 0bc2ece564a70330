"""What the command-line tools share: the argument parser (a usage error is one line, exit
status 2), ``--device`` and ``--backend`` checks."""
from __future__ import annotations

import argparse
import sys

import torch

import segnext_kernels


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


def parse_device(name: str, error=ValueError) -> torch.device:
    """The ``--device`` of a command line: cpu, cuda or cuda:N of a visible GPU; anything else
    raises ``error`` with a one-line message."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error("--device cuda, but no CUDA GPU is visible to PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are "
                        "visible")
    return device


def check_backend(name: str, error=ValueError) -> None:
    """Raise ``error`` with a one-line message when ``--backend name`` (other than auto)
    cannot run here."""
    if name != "auto":
        status = segnext_kernels.available_backends()[name]
        if not status.available:
            raise error(f"--backend {name} is not available here: {status.reason}")
