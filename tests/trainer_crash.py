"""examples/pretrain_gpt_usp.py, except that rank 1 is SIGKILLed as it starts writing the checkpoint of iteration
``$KILL_AT_ITERATION``: a node lost in the middle of a checkpoint write (torchrun then stops the other ranks)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pretrain_gpt_usp  # noqa: E402
from megatron.core import dist_checkpointing  # noqa: E402

_save = dist_checkpointing.save


def save_then_die(state, directory, *args, **kwargs):
    if int(os.environ["RANK"]) == 1 and Path(directory).name == f"iter_{int(os.environ['KILL_AT_ITERATION']):07d}.partial":
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(state, directory, *args, **kwargs)


dist_checkpointing.save = save_then_die

if __name__ == "__main__":
    pretrain_gpt_usp.main()
