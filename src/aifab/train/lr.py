"""Learning-rate schedule: linear warmup, then cosine decay over the budget's progress.

Progress is the larger of steps done / step budget and seconds spent / time budget, so a time-limited
run decays to its floor exactly when its time runs out.
"""

import math


def lr_at(step: int, progress: float, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    floor = peak_lr * min_lr_ratio
    p = min(max(progress, 0.0), 1.0)
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * p))
