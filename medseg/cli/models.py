"""``medseg models``: list the registered models with their dimensions, size at default settings and paper."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  medseg models                       table of every model (parameters at default settings, in=4, out=3, 3D)
  medseg models --name unet --name vnet
  medseg models --model-module my_models.py    also the models that my_models.py registers
Use a name in a pipeline file as  model: {name: unet, spatial_dims: 3, kwargs: {channels: [16, 32, 64]}};
arguments of each model: docs/models.md."""


def register(sub) -> None:
    p = sub.add_parser("models", help="list the registered segmentation models", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", action="append", default=None, help="only this model (repeatable)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels for the parameter count (default 4)")
    p.add_argument("--out-channels", type=int, default=3, help="output channels for the parameter count (default 3)")
    p.add_argument("--model-module", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a module that registers models first (repeatable)")
    p.set_defaults(func=run)


def parameter_count(name: str, spatial_dims: int, in_channels: int, out_channels: int) -> int:
    """Parameters of ``name`` at default settings, built on the meta device (no memory, instant)."""
    import torch

    from medseg.models import create_model

    with torch.device("meta"):
        model = create_model(name, spatial_dims, in_channels, out_channels)
    return sum(p.numel() for p in model.parameters())


def run(args) -> int:
    from medseg.models import get_entry, list_models, load_model_module

    for module in args.model_module:
        load_model_module(module)
    names = [get_entry(n).name for n in args.name] if args.name else list_models()
    rows = []
    for name in names:
        entry = get_entry(name)
        dims = 3 if 3 in entry.spatial_dims else entry.spatial_dims[0]
        try:
            params = f"{parameter_count(name, dims, args.in_channels, args.out_channels) / 1e6:.2f}M ({dims}D)"
        except Exception:  # a user's or MONAI model with required arguments
            params = "needs arguments"
        rows.append((name, ",".join(f"{d}D" for d in entry.spatial_dims), params,
                     entry.paper + (f" [from {entry.source}]" if entry.source else "")))
    header = ("model", "dims", f"params in={args.in_channels} out={args.out_channels}", "paper")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0
