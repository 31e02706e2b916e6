"""What a run will compute on, measured before any compute is spent: the device, precision and compile
choice (`resolve_device`), training FLOPs per token for MFU, and a floor on the memory a run needs
(`estimate_train_bytes`) against what the device has (`available_bytes`)."""

import os
from dataclasses import dataclass

from aifab.errors import TrainError
from aifab.nn.config import ModelConfig
from aifab.spec import TrainingSpec


@dataclass(frozen=True)
class Device:
    """Where and how the loop computes: resolved from the spec's "auto" values before any compute is spent."""

    type: str  # "cpu" | "cuda"
    dtype: str  # "fp32" | "bf16": the autocast dtype of the matmuls; weights and optimizer stay fp32
    compile: bool
    name: str  # the card's or CPU's name, for the report
    peak_flops: float | None  # dense peak FLOP/s for `dtype` from the catalog (None: unknown card)


def resolve_device(cfg: TrainingSpec) -> Device:
    """Resolve device, dtype and compile; raises TrainError when CUDA is asked for and absent."""
    import torch

    from aifab.meter.catalog import cpu_peak_flops, cpu_probe, gpu_peak_flops

    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise TrainError(
            f"training.device is 'cuda' but torch {torch.__version__} sees no CUDA device; set it to auto or cpu"
        )
    kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and has_cuda) else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if kind == "cuda" else "fp32")
    compile_ = kind == "cuda" if cfg.compile == "auto" else bool(cfg.compile)
    if kind == "cuda":
        name = torch.cuda.get_device_name()
        return Device(kind, dtype, compile_, name, gpu_peak_flops(name, dtype))
    ghz, lanes = cpu_probe()
    cores = os.cpu_count() or 1  # the loop uses every logical CPU (torch.set_num_threads in train)
    # the fp32 FMA peak, also under bf16: it is the conservative figure for CPUs without bf16 FMA units
    peak = cpu_peak_flops(cores, ghz, lanes)
    return Device("cpu", dtype, compile_, f"cpu: {cores} cores at {ghz:.2f} GHz, {lanes} fp32 lanes", peak)


def flops_per_token(n_params: int, n_layer: int, d_model: int, context_len: int) -> int:
    """Training FLOPs per token: 6N for the forward and backward matmuls of N parameters, plus 12*L*d*T for
    attention (QK^T and AV, forward and backward). The estimate of PaLM (Chowdhery et al. 2022, appendix B)
    as nanoGPT's `estimate_mfu` uses it."""
    return 6 * n_params + 12 * n_layer * d_model * context_len


def estimate_train_bytes(
    config: ModelConfig, params: int, trainable: int, batch: int, window: int, dtype: str, shards: int = 1
) -> int:
    """A floor on the memory one training process needs, to refuse shapes that cannot fit before allocating:
    fp32 weights (4 B/parameter), fp32 gradients and the two AdamW moments of the trainable ones (12 B each),
    the fp32 logits and their gradient, and per layer the ~10 d-wide activations per token that the backward
    pass keeps (2 B each under bf16 autocast). Real use is higher; only a shape below this floor can fit.
    `batch` is the per-process batch; under FSDP the weights and optimizer state are split `shards` ways."""
    tokens = batch * window
    act = 2 if dtype == "bf16" else 4
    activations = tokens * config.n_layer * 10 * config.d_model * act + tokens * config.vocab_size * 8
    return (4 * params + 12 * trainable) // shards + activations


def available_bytes(device: "Device") -> int:
    """Memory the run may use: the GPU's total memory, or the host's MemAvailable (Linux) / physical memory."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
