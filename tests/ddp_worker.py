"""Run by torchrun in tests/test_training_run.py: trains, then saves this rank's weights for comparison."""
import os
import sys
from pathlib import Path

import torch

from medseg.training.config import load_pipeline
from medseg.training.trainer import RunOptions, Trainer

pipeline, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
trainer = Trainer(load_pipeline(pipeline), RunOptions(run_dir=run_dir, progress=False))
rank = int(os.environ["RANK"])
out.mkdir(parents=True, exist_ok=True)
if rank == 0:
    torch.save({k: v.clone() for k, v in trainer.step.bare_model.state_dict().items()}, out / "initial.pt")
weights = trainer.step.bare_model
trainer.run()
torch.save(weights.state_dict(), out / f"rank{rank}.pt")
