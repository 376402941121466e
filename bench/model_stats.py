"""Parameters and GFLOPs per registered model at default settings; prints a markdown table.

3D: one 4 x 128^3 window, 3 outputs. 2D: one 3 x 512^2 image, 2 outputs. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, no compute), so the whole table
takes seconds on a CPU. One multiply-add counts as 2 FLOPs; only convolutions, matrix products and their
transposes are counted (norms, activations and interpolation are not).

    python bench/model_stats.py            # all models, both settings
    python bench/model_stats.py unet vnet  # some models
"""
from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.models import MODELS, create_model, list_models

SETTINGS = {3: (4, 3, (128, 128, 128)), 2: (3, 2, (512, 512))}


def stats(name: str, dims: int) -> tuple[int, float]:
    """(parameters, forward GFLOPs for one window in eval mode)."""
    cin, cout, size = SETTINGS[dims]
    with torch.device("meta"):
        model = create_model(name, dims, cin, cout).eval()
        x = torch.empty(1, cin, *size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def main(names: list[str]) -> None:
    print(f"| model | 3D params (4→3) | 3D GFLOPs 4×128³ | 2D params (3→2) | 2D GFLOPs 3×512² |")
    print("|---|---:|---:|---:|---:|")
    for name in names or list_models():
        cells = []
        for dims in (3, 2):
            if dims in MODELS[name].spatial_dims:
                params, gflops = stats(name, dims)
                cells += [f"{params / 1e6:.2f}M", f"{gflops:,.0f}"]
            else:
                cells += ["–", "–"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
