"""The `length` reproduce table's training point (experiments/reproduce/length.py, budget `full`:
books, T = 128, dropout 0.1, early stopping, 8000-step cap) as a config file, for variants of its
points with the sweep CLI, e.g. the training context covering B'MOJO's whole eidetic span
((lag + eidetic_slots / eidetic_per_chunk) x window = 192 tokens at the defaults), with the
table's tokens per step (8 x 256 = 16 x 128):

    python -m experiments.sweep --config=experiments/configs/length.py --args=bmojo \\
        --lrs=3e-3 --seeds=0 --set=data.seq_len=256,batch_size=8 --root=workdir/sweeps/length_T256 \\
        --out=results/length_T256 --commit
    python -m experiments.evaluate --workdir=workdir/sweeps/length_T256/bmojo-lr0.003-s0 \\
        --split=test --seq_len=4096 --batch_size=8 --max_batches=1
"""

from experiments.reproduce import length


def get_config(preset: str = "bmojo"):
    return length.point_config(preset, length.budgets()["full"])
