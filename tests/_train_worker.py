"""Worker for the distributed / fault tests: ``python -m torch.distributed.run ... _train_worker.py OUT JSON``.

Trains with the JSON config overrides, then writes this rank's final method state_dict and per-step losses to
``OUT/rank<r>.pt``.
"""

import json
import os
import sys

import torch

from ssl_fast.train import Trainer, make_config

if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    trainer = Trainer(make_config(overrides))
    summary = trainer.fit()
    state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in trainer.method.state_dict().items()}
    torch.save({"state": state, "losses": trainer.losses(), "summary": {k: v for k, v in summary.items()
                                                                        if isinstance(v, (int, float, str))}},
               os.path.join(out_dir, f"rank{summary['rank']}.pt"))
