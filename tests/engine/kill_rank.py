"""Test helper (not part of the package): tools/train_det.py whose rank KILL_RANK (default 1) kills itself with
SIGKILL right after iteration KILL_AT of the job's first attempt (TORCHELASTIC_RESTART_COUNT 0), as a crashed
machine or an out-of-memory kill would; once torchrun restarted the workers it trains on untouched.

    KILL_AT=6 torchrun --max-restarts=1 --nproc_per_node=2 tests/engine/kill_rank.py --cfg ... (test_elastic.py)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import train_det  # noqa: E402

from detectron_res.engine.trainer import Trainer  # noqa: E402
from detectron_res.utils import comm  # noqa: E402

run_step = Trainer.run_step


def run_step_then_die(self: Trainer) -> None:
    run_step(self)
    if (self.iter + 1 == int(os.environ["KILL_AT"]) and comm.get_rank() == int(os.environ.get("KILL_RANK", 1))
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0):
        os.kill(os.getpid(), signal.SIGKILL)


Trainer.run_step = run_step_then_die

if __name__ == "__main__":
    sys.exit(train_det.run_tool(train_det.main, sys.argv[1:]))
