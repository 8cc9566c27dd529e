"""Configuration of mask training (both stages), validated on creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import LeanKError
from ..masks import DEFAULT_RECENT, DEFAULT_SINK, check_sparsity, check_window

STAGE2_KEEP = ("best", "last")
GRAPHS_AUTO_PARAMS = 1_000_000_000


def sparsity_label(sparsity: float) -> str:
    """A target sparsity as stage and mask file names write it (``stage2-0.70``, ``mask-0.70``): two
    decimals, or as many more as it needs (0.855 -> ``0.855``, not ``0.85``), up to six; a float32 0.7
    (0.69999998...) is ``0.70``. Targets that round to one label are refused by the config."""
    for digits in range(2, 6):
        text = f"{sparsity:.{digits}f}"
        if abs(float(text) - sparsity) < 5e-8:  # float32's rounding of a short decimal stays under this
            return text
    return f"{sparsity:.6f}"


def old_sparsity_label(sparsity: float) -> str:
    """The label the trainer wrote before 2026-11-30 (two decimals: 0.855 -> ``0.85``), to recognise its runs
    on ``--resume``."""
    return f"{sparsity:.2f}"


@dataclass(frozen=True)
class TrainConfig:
    """Two-stage LeanK distillation (DESIGN.md §1).

    Defaults follow the paper's recipe (λ 0.06, AdamW lr 0.02 then 0.01 with λ 0, batch 1,
    warm-up/decay over 20% of the steps) with these changes: the distillation loss is the
    MSE of final hidden states *relative to the teacher's mean square* (so λ means the same
    for every hidden size); 800 + 150 steps instead of the paper's 2000 + 200 (enough for
    SmolLM2-135M, whose α settles by step ~600, and both stages fit in 10 minutes on an H100:
    benchmarks/results/train_smollm2); contexts of 4K–8K tokens (SmolLM2's range; the paper
    used 4K–96K for Llama-3.1-8B).
    """

    model: str = "smollm2-135m"
    out: str = "runs/leank"
    sparsities: tuple[float, ...] = (0.7,)
    alignment: int = 16
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    min_length: int = 4096
    max_length: int = 8192
    stage1_steps: int = 800
    stage2_steps: int = 150
    lr1: float = 0.02
    lr2: float = 0.01
    reg: float = 0.06
    batch: int = 1  # samples per optimiser step (gradient accumulation)
    warmup: float = 0.2  # fraction of steps with linear lr warm-up from lr_floor
    decay: float = 0.2  # fraction of final steps with linear decay to lr_floor
    lr_floor: float = 0.1
    kinds: tuple[str, ...] = ("passkey", "multikey", "multivalue")
    haystacks: tuple[str, ...] = ("filler", "prose", "distractor")
    corpus: str | None = None
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "cuda"
    dtype: str = "bfloat16"
    workers: int = 2
    validation_samples: int = 16  # held-out samples for the before/after-binarisation losses
    fsdp: bool = False  # under torchrun: shard the frozen model with FSDP2 (memory only, same result)
    # recompute each layer's attention in the backward pass (memory only, same result); None: auto, decided by
    # the trainer's memory check (off when the longest sample fits comfortably, see Trainer.check_memory)
    recompute: bool | None = None
    # each sample's decode-region passes at padded shapes as CUDA graphs (leank.train.graphs): small models' steps
    # are bound by the host (SmolLM2 on an H200: 0.23 -> 0.10 s per stage-1 step). None: auto, on for a model of
    # fewer than GRAPHS_AUTO_PARAMS parameters on one GPU (no torchrun) that graphs.unsupported accepts (no sliding
    # windows, no length-dependent RoPE, no experts); a large model's step is bound by arithmetic, and capturing
    # each of its many shapes would cost more than it saves
    cuda_graphs: bool | None = None
    stage1_alpha: str | None = None  # alpha.safetensors of a finished stage 1 (same model): stage 1 skipped
    # "last": each mask from stage 2's α (the paper's recipe); "best": from stage 1's α binarised instead when
    # stage 2 raised the binarised mask's held-out loss (the two can land at slightly different sparsities)
    stage2_keep: str = "last"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(check_sparsity(s) for s in self.sparsities))
        if not self.sparsities:
            raise LeanKError("give at least one target sparsity, e.g. --sparsity 0.7")
        labels = [sparsity_label(s) for s in self.sparsities]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:  # one stage 2, checkpoint and mask file per sparsity: a repeat would overwrite them
            raise LeanKError(f"sparsity {', '.join(twice)} given twice (or targets that round to it): give each "
                             "target sparsity once")
        if not isinstance(self.alignment, int) or self.alignment < 1:
            raise LeanKError(f"alignment must be a positive integer, got {self.alignment!r}")
        check_window(self.sink, self.recent)
        if self.stage1_steps < 1:
            raise LeanKError(f"stage1_steps must be at least 1, got {self.stage1_steps}: stage 1 learns the channel "
                             "importance α, so with no step every channel ties and the mask would be arbitrary")
        if self.stage2_keep not in STAGE2_KEEP:
            raise LeanKError(f"stage2_keep must be one of {', '.join(STAGE2_KEEP)}, got {self.stage2_keep!r}")
        if self.stage2_steps < 0:
            raise LeanKError(f"stage2_steps must be >= 0, got {self.stage2_steps} (0: binarise α without fine-tuning)")
        for name in ("lr1", "lr2", "batch", "checkpoint_every", "validation_samples"):
            if getattr(self, name) <= 0:
                raise LeanKError(f"{name} must be positive, got {getattr(self, name)}")
        if self.reg < 0:
            raise LeanKError(f"reg (λ) must be >= 0, got {self.reg}")
        if not (0 <= self.warmup <= 1 and 0 <= self.decay <= 1 and self.warmup + self.decay <= 1):
            raise LeanKError("warmup and decay are fractions of the steps and must add up to at most 1")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise LeanKError(f"cuda_graphs must be True, False or None (auto), got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.fsdp:
            raise LeanKError("--cuda-graphs runs on one GPU, without --fsdp: drop one of them")
        if self.min_length <= self.sink + self.recent:
            raise LeanKError(
                f"min_length {self.min_length} leaves no middle tokens with sink {self.sink} + recent "
                f"{self.recent}: raise --min-length"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    # Fields that must match to resume a run (the rest, e.g. workers or device, may change).
    RESUME_KEYS = (
        "model",
        "alignment",
        "sink",
        "recent",
        "min_length",
        "max_length",
        "stage1_steps",
        "lr1",
        "lr2",
        "stage2_steps",
        "reg",
        "batch",
        "warmup",
        "decay",
        "lr_floor",
        "kinds",
        "haystacks",
        "corpus",
        "seed",
        "stage1_alpha",
    )  # not cuda_graphs: a failed capture says to resume with --no-cuda-graphs (then not bit for bit: other rounding)

    def lr_factor(self, step: int, steps: int) -> float:
        """Warm-up from ``lr_floor`` to 1 over the first ``warmup`` fraction, flat, then
        linear decay back to ``lr_floor`` over the last ``decay`` fraction."""
        warm, dec = self.warmup * steps, self.decay * steps
        if warm and step < warm:
            return self.lr_floor + (1 - self.lr_floor) * step / warm
        if dec and step >= steps - dec:
            return self.lr_floor + (1 - self.lr_floor) * (steps - 1 - step) / dec
        return 1.0
