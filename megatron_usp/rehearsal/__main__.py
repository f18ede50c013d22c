"""``python -m megatron_usp.rehearsal [--thd-reference-attention] [--mla-reference-attention] SCRIPT ARGS...``:
the launcher (:func:`megatron_usp.rehearsal.launcher.main`)."""
import sys

from .launcher import main

if __name__ == "__main__":
    main(sys.argv[1:])
