"""The trainer (megatron_usp.train), except that rank 1 is SIGKILLed as it starts writing the checkpoint of iteration
``$KILL_AT_ITERATION``: a node lost in the middle of a checkpoint write (torchrun then stops the other ranks)."""
import os
import signal
from pathlib import Path

from megatron.core import dist_checkpointing

from megatron_usp import train

_save = dist_checkpointing.save


def save_then_die(state, directory, *args, **kwargs):
    if int(os.environ["RANK"]) == 1 and Path(directory).name == f"iter_{int(os.environ['KILL_AT_ITERATION']):07d}.partial":
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(state, directory, *args, **kwargs)


dist_checkpointing.save = save_then_die

if __name__ == "__main__":
    train.main()
