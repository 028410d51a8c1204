"""Driver scripts run by `benchmarks.peers` inside each peer's own virtual environment.

They import nothing from this repository: each one is executed by a different Python. Protocol
(`common.serve`): build the model and a jit-compiled (or eager, for PyTorch) training step, run one
warm-up step, print one JSON line {"ready": true, "params": N, ...}; then for every line "step" on
stdin run one timed step and print {"seconds": s}; "quit" (or end of input) exits.
"""
