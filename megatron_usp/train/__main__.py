"""``python -m megatron_usp.train`` (under torchrun): a bad flag or data file ends with its message (exit 1, no
traceback) on every rank before any process group; then the training loop."""
import sys

from .args import configure
from .loop import main

try:
    configured = configure()
except ValueError as flag_error:
    sys.exit(f"megatron_usp.train: error: {flag_error}")
main(configured=configured)
