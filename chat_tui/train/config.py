"""What a training run is: its settings (`TrainConfig`), the defaults of each kind of run, and its
learning-rate schedule.

No torch here: the CLI's parser and --help, and the app's training screen, read these defaults
without loading the trainer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from chat_tui.engine.gptconfig import ACTIVATIONS
from chat_tui.errors import TrainingError

KINDS = ("pretrain", "sft")

# What each kind of run changes from the field defaults of TrainConfig below (pretraining's, but a
# run's length). The one place these are written: the CLI, its --help, the training screen and
# train() (a run given neither --max-steps nor --time-budget) all read TrainConfig.defaults(kind).
KIND_SETTINGS: dict[str, dict] = {
    "pretrain": {"max_steps": 2000},
    "sft": {"lr": 3e-4, "warmup": 20, "batch_size": 8, "max_steps": 500},
}


@dataclass
class TrainConfig:
    kind: str = "pretrain"  # "pretrain" or "sft"
    data: list[str] = field(default_factory=list)
    out: str = ""
    init_from: str | None = None  # sft: the checkpoint to fine-tune
    # model (pretraining; fine-tuning keeps the checkpoint's)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    activation: str = "gelu_tanh"  # GPT-2's tanh GELU; "gelu" is the exact one (nanoGPT's nn.GELU)
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    max_steps: int | None = None  # None: the time budget decides, or else the kind's default
    time_budget: float | None = None  # seconds
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation, logging, saving
    eval_every: int = 250
    eval_iters: int = 20
    log_every: int = 10
    save_every: int | None = None  # default: eval_every
    val_fraction: float = 0.1
    seed: int = 1337
    device: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        self.data = [str(p) for p in self.data]
        self.out = str(self.out)
        if self.init_from is not None:
            self.init_from = str(self.init_from)

    @classmethod
    def defaults(cls, kind: str) -> TrainConfig:
        """Every setting a run of this kind uses when it is not given."""
        if kind not in KIND_SETTINGS:
            raise TrainingError(f"unknown training kind {kind!r}")
        return cls(kind=kind, **KIND_SETTINGS[kind])

    @classmethod
    def of_kind(cls, kind: str, **given) -> TrainConfig:
        """A run of this kind: `given` over the kind's defaults (a time budget alone sets no step limit)."""
        settings = asdict(cls.defaults(kind))
        if given.get("time_budget") is not None and given.get("max_steps") is None:
            settings["max_steps"] = None
        return cls(**{**settings, **given})

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainingError(message)

        need(self.kind in KINDS, f"unknown training kind {self.kind!r}")
        need(bool(self.out), "no output folder (--out DIR)")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_every",
                     "eval_iters", "log_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"--{name.replace('_', '-')} must be a whole number ≥ 1, not {value!r}")
        need(self.n_embd % self.n_head == 0, f"--n-embd ({self.n_embd}) must be a multiple of --n-head ({self.n_head})")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), not {self.dropout}")
        need(self.activation in ACTIVATIONS,
             f"--activation must be {' or '.join(ACTIVATIONS)}, not {self.activation!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, not {self.lr}")
        need(self.warmup >= 0, f"--warmup must be ≥ 0, not {self.warmup}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be ≥ 1, not {self.max_steps}")
        need(self.time_budget is None or self.time_budget > 0, "--time-budget must be positive")
        need(self.weight_decay >= 0, f"--weight-decay must be ≥ 0, not {self.weight_decay}")
        need(self.grad_clip >= 0, f"--grad-clip must be ≥ 0, not {self.grad_clip}")
        need(0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, not {self.val_fraction}")
        if self.kind == "sft":
            need(bool(self.init_from), "fine-tuning needs a checkpoint to start from (--from CKPT)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def setting_text(value: float | int | str) -> str:
    """A setting as --help and the training screen show it: 1e-3 rather than 0.001, 1 rather than 1.0."""
    if isinstance(value, float) and value and abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to the final lr (by steps or by time)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.max_steps is not None:
        progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    else:
        progress = time_fraction or 0.0
    progress = min(1.0, max(0.0, progress))
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)
