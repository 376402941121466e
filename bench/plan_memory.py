"""Peak memory of one training step against the planner's estimate (medseg.planning.network.training_bytes).

The planner shrinks the patch until its estimate fits the memory budget; the estimate's activation factor was
fitted here. Each configuration runs in a fresh process: the growth of the process's peak resident memory
(``ru_maxrss``) over its size before the first step is what one step of forward, loss, backward and AdamW needs.
CPU only (on a GPU, compare with ``torch.cuda.max_memory_allocated`` instead).

    python bench/plan_memory.py                # the table in docs/planning.md
    python bench/plan_memory.py --quick        # two configurations
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CONFIGS = [  # (patch, batch, bf16, base width)
    ((64, 64, 64), 2, False, 16), ((64, 64, 64), 2, True, 16),
    ((96, 96, 96), 2, False, 16), ((96, 96, 96), 2, True, 16),
    ((128, 128, 96), 2, False, 16), ((128, 128, 96), 2, True, 16),
    ((96, 96, 96), 2, False, 32), ((160, 160), 16, False, 16),
]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(cfg: dict) -> dict:
    """One training step in this process; bytes of peak growth."""
    import torch
    import torch.nn.functional as F

    from medseg.models import create_model
    from medseg.planning.network import build_network

    net = build_network(tuple(cfg["patch"]), (1.0,) * len(cfg["patch"]), cfg["base"], 320 if cfg["base"] == 32 else 256)
    model = create_model(net.model_name, net.spatial_dims, 4, 3, **net.model_kwargs)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(cfg["batch"], 4, *net.patch)
    y = (torch.rand(cfg["batch"], 3, *net.patch) > 0.5).float()
    base = _rss()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
        out = model(x)
    loss = F.binary_cross_entropy_with_logits(out.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"grown": peak - base, "patch": list(net.patch), "channels": list(net.channels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from medseg.planning.network import ACTIVATION_FACTOR, activation_units, build_network, parameter_count, training_bytes

    print("| patch | batch | precision | widths | measured GiB | estimate GiB | estimate / measured | fitted factor |")
    print("|---|---|---|---|---|---|---|---|")
    for patch, batch, bf16, base in CONFIGS[:2] if args.quick else CONFIGS:
        cfg = {"patch": patch, "batch": batch, "bf16": bf16, "base": base}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        net = build_network(patch, (1.0,) * len(patch), base, 320 if base == 32 else 256)
        est = training_bytes(net, batch, 4, 3, bf16)
        fitted = (got["grown"] - 12 * parameter_count(net, 4, 3)) / (batch * activation_units(net) * 4)
        print(f"| {'x'.join(map(str, got['patch']))} | {batch} | {'bf16' if bf16 else 'fp32'} | {got['channels'][0]}-{max(got['channels'])} "
              f"| {got['grown'] / 2**30:.2f} | {est / 2**30:.2f} | {est / got['grown']:.2f} | {fitted:.1f} |", flush=True)
    print(f"factors used by the planner: {ACTIVATION_FACTOR}")


if __name__ == "__main__":
    main()
