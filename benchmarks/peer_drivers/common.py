"""The stdin/stdout protocol shared by the peer drivers (see `__init__`); no third-party imports."""

import argparse
import json
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--variant", default="")
    return parser.parse_args()


def serve(step, info):
    """step(): one blocking training step. info: JSON-able dict announced with "ready"."""
    step()  # warm-up (and compilation, for JAX)
    print(json.dumps(dict(info, ready=True)), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "step":
            start = time.perf_counter()
            step()
            print(json.dumps(dict(seconds=time.perf_counter() - start)), flush=True)
