"""Run by torchrun in tests/test_training_run.py: trains, then saves this rank's weights for comparison."""
import os
import sys
from pathlib import Path

import torch

from medseg.training.config import load_pipeline
from medseg.training.run import Run, RunOptions
from medseg.training.trainer import run_training

pipeline, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
run = Run.build(load_pipeline(pipeline), RunOptions(run_dir=run_dir, progress=False))
rank = int(os.environ["RANK"])
out.mkdir(parents=True, exist_ok=True)
if rank == 0:
    torch.save({k: v.clone() for k, v in run.step.bare_model.state_dict().items()}, out / "initial.pt")
weights = run.step.bare_model
run_training(run)
torch.save(weights.state_dict(), out / f"rank{rank}.pt")
