"""The `pyllama-ssm` command (also `python -m pyllama_ssm`)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import PyllamaError


def _plan(args: argparse.Namespace) -> None:
    from . import planner
    p = planner.plan(args.model, args.ctx, args.parallel, snapshots=args.snapshots, type_k=args.type_k,
                     type_v=args.type_v, n_gpu_layers=args.n_gpu_layers, n_ubatch=args.ubatch)
    print(json.dumps(p.to_json(), indent=2) if args.json else planner.format_plan(p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyllama-ssm")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="bytes per component for serving P clients, from GGUF metadata alone")
    plan.add_argument("model", help="a GGUF file (only its metadata and tensor table are read)")
    plan.add_argument("--ctx", type=int, required=True, help="context length per client, in tokens")
    plan.add_argument("--parallel", type=int, default=1, help="clients served at once (default 1)")
    plan.add_argument("--snapshots", type=int, default=0, help="shared recurrent snapshots (n_rs_pool)")
    plan.add_argument("--type-k", default="f16", help="K cache type: f16, q8_0, ... (default f16)")
    plan.add_argument("--type-v", default="f16", help="V cache type (default f16)")
    plan.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all)")
    plan.add_argument("--ubatch", type=int, default=512, help="micro-batch size, for the compute estimate")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_plan)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (PyllamaError, ValueError) as e:
        print(f"pyllama-ssm {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
