"""The training loop: pretraining and chat fine-tuning, resumable, data parallel, crash safe.

One loop serves both stages; only the data differs (token windows or packed conversations with
a loss mask). What it guarantees:

- AdamW with weight decay on matrices only, linear warm-up then cosine decay to min_lr (by steps,
  or by the share of `time_budget` spent), gradient clipping, gradient accumulation, bf16 autocast
  on CUDA and fp32 elsewhere, optional `torch.compile`.
- Every `eval_every` steps: validation loss and bits per byte on fixed validation windows; the
  best checkpoint by validation loss is kept in OUT/best/.
- OUT/ itself is always a complete checkpoint (config.json, model.safetensors, tokenizer.json,
  generation_config.json) that `chat-tui --model OUT` opens, and OUT/train_state.pt holds what
  resuming needs (weights, optimiser, step, random generators, elapsed time). Every file is
  written to a temp file, fsynced and renamed: a crash, Ctrl-C or a full disk never leaves a
  broken checkpoint. train_state.pt carries its own copy of the weights, so it is consistent on
  its own even if a save fails half-way.
- A stop request (Ctrl-C) ends the step in progress, saves and returns. A NaN or infinite loss or
  gradient stops the run with a TrainingError before the optimiser touches the weights; a NaN or
  infinite validation loss or weight stops it before anything is saved. Either way the last saved
  checkpoint is left as it was: no checkpoint with a validation loss that is not finite is ever
  saved, or marked best.
- Resume restores everything, and the batches of a step are a function of (seed, step), so N steps
  in one go and N/2 + resume + N/2 give the same losses.
- Under torchrun (RANK/WORLD_SIZE set) it runs DDP: gloo on CPU, NCCL on GPU. Each process takes
  its slice of the step's global batch (batch_size x grad_accum x processes), so K steps on N
  processes match K steps on one process with the same global batch.
- OUT/metrics.jsonl gets one JSON line per logged step; OUT/status.json says whether the run is
  running, done, interrupted or failed.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from chat_tui.engine.checkpoint import load_model, save_checkpoint
from chat_tui.engine.devices import resolve_device
from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.model import GPT, GPTConfig, token_losses
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import ChatTokenizer
from chat_tui.errors import DeviceError, TrainingError, first_line
from chat_tui.train.config import TrainConfig, lr_at
from chat_tui.train.data import DataError
from chat_tui.train.duration import parse_duration  # noqa: F401 - part of this module's interface

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
BEST_DIR = "best"
STATE_VERSION = 1
PRETRAIN_DEFAULTS = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=200)


@dataclass
class TrainResult:
    out: Path
    step: int
    reason: str  # "done", "time budget", "interrupted"
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    elapsed_s: float
    tokens: int
    history: list[dict]


def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus attention (PaLM appendix B, as nanoGPT)."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size


# --- distributed ------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _broadcast_error(d: Dist, message: str | None) -> None:
    """Rank 0 tells every process whether it failed, so no process waits for it forever."""
    if d.enabled:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise DataError(message)


def _rank0_first(d: Dist, fn: Callable):
    """Run `fn` on rank 0 first (it fills the cache), then on the others (they read it)."""
    if not d.enabled:
        return fn()
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except DataError as exc:
            error = str(exc)
    _broadcast_error(d, error)
    return result if d.main else fn()


# --- checkpoint state -------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def read_train_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: missing: nothing to resume (was the run saved?)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is reported the same way
        raise TrainingError(f"{path}: unreadable ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: not a chat-tui training state")
    return state


def resume_config(out: str | Path) -> TrainConfig:
    """The configuration a stopped run was started with."""
    return TrainConfig.from_dict(read_train_state(Path(out))["config"])


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def read_metrics(out: str | Path) -> list[dict]:
    """Every complete line of OUT/metrics.jsonl (a line being written is skipped)."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# --- before the loop: the output folder and the data -------------------------------------------------


def refuse_unfinished_run(out: Path, log: Callable[[str], None] | None = None) -> None:
    """A new run may replace a finished one in OUT, never one that could still be resumed."""
    out = Path(out)
    if not (out / STATE_FILE).is_file():
        return
    try:
        status = json.loads((out / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {}
    if status.get("state") != "done":
        raise TrainingError(f"{out} holds an unfinished run (step {status.get('step', '?')}, "
                            f"{status.get('state', 'unknown')}): continue it with --resume {out}, "
                            "or choose another --out")
    if log:
        log(f"replacing the finished run in {out} (step {status.get('step')})")


def saved_tokenizer(out: Path) -> ChatTokenizer:
    try:
        return ChatTokenizer.from_file(Path(out) / "tokenizer.json")
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise TrainingError(f"{Path(out) / 'tokenizer.json'}: unreadable, cannot resume ({first_line(exc)})") from None


def prepare_data(cfg: TrainConfig, *, resume: bool = False, tokenizer: ChatTokenizer | None = None, log=None):
    """Tokenise, split and cache the run's data (or read it from the cache beside OUT).

    Pretraining trains its tokenizer, or on resume reuses the one saved in OUT; fine-tuning uses
    the checkpoint's (`tokenizer`, or read from --from / OUT).
    """
    from chat_tui.train.dataset import CACHE_DIR, prepare_pretrain, prepare_sft

    out = Path(cfg.out)
    cache_root = out.resolve().parent / CACHE_DIR
    if cfg.kind == "pretrain":
        return prepare_pretrain(cfg.data, tokenizer_kind=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                block_size=cfg.block_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                cache_root=cache_root, tokenizer=saved_tokenizer(out) if resume else None, log=log)
    from chat_tui.engine.checkpoint import read_config

    source = out if resume else Path(str(cfg.init_from))
    block_size = read_config(source).block_size
    if tokenizer is None:
        _, tokenizer, _ = load_model(source, device="cpu")  # also proves the checkpoint loads
    return prepare_sft(cfg.data, tokenizer, block_size=block_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                       cache_root=cache_root)


# --- the loop ---------------------------------------------------------------------------------------


class _Batches:
    """Turns a sampler's rows into (x, y, mask) tensors for one process's micro-batches."""

    def __init__(self, sampler, cfg: TrainConfig, d: Dist, device: torch.device) -> None:
        self.sampler = sampler
        self.cfg = cfg
        self.d = d
        self.device = device
        self.global_rows = cfg.batch_size * cfg.grad_accum * d.world

    def step(self, step: int):
        ids, mask = self.sampler.rows(step, self.global_rows)
        B = self.cfg.batch_size
        for micro in range(self.cfg.grad_accum):
            start = (self.d.rank * self.cfg.grad_accum + micro) * B
            yield to_tensors(ids[start : start + B], None if mask is None else mask[start : start + B], self.device)


def to_tensors(ids: np.ndarray, mask: np.ndarray | None, device: torch.device):
    x = torch.from_numpy(np.ascontiguousarray(np.maximum(ids[:, :-1], 0)))
    y = torch.from_numpy(np.ascontiguousarray(ids[:, 1:]))
    m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[:, 1:]))
    if device.type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        m = None if m is None else m.to(device, non_blocking=True)
    return x, y, m


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    A training step allocates and frees the same activation-sized buffers (MBs each) every step;
    by default glibc maps large blocks fresh and trims freed heap, so every step pays page faults
    on memory it just gave back. Keeping it (as tcmalloc/jemalloc would) makes the CPU step's
    elementwise work several times cheaper. Linux/glibc only; elsewhere a no-op.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ with the foreach kernels (one call for all parameters) where the device has them."""
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and embeddings) only, not on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # one kernel for all parameters (CPU and CUDA)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def training_device(requested: str | None) -> torch.device:
    """The device `--device` names (the best one here when None), or a TrainingError saying why not."""
    try:
        return resolve_device(requested)
    except DeviceError as exc:
        raise TrainingError(str(exc)) from None


class Trainer:
    """One run. `run()` trains until max_steps, the time budget, or a stop request."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        stop: threading.Event | None = None,
        on_metrics: Callable[[dict], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.resume = resume
        self.stop = stop or threading.Event()
        self.on_metrics = on_metrics
        self.log = log or (lambda line: None)
        self.out = Path(cfg.out)

    # -- setup --

    def _setup(self) -> None:
        cfg = self.cfg
        device = training_device(cfg.device)
        self.d = init_distributed(device.type)
        if device.type == "cuda" and self.d.enabled:
            device = torch.device("cuda", self.d.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else nullcontext()
        )
        if self.d.main:
            if not self.resume:
                refuse_unfinished_run(self.out, self.log)
                # a finished run being replaced: its resume state and best checkpoint go now, not at the first save
                (self.out / STATE_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.out / BEST_DIR, ignore_errors=True)
            self.out.mkdir(parents=True, exist_ok=True)
        defaults = PRETRAIN_DEFAULTS
        if cfg.kind == "pretrain":
            from chat_tui.train.dataset import WindowSampler

            data = _rank0_first(self.d, lambda: prepare_data(cfg, resume=self.resume,
                                                              log=self.log if self.d.main else None))
            self.tokenizer = data.tokenizer
            model_config = GPTConfig(vocab_size=self.tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                                     activation=cfg.activation)
            torch.manual_seed(cfg.seed)
            model = GPT(model_config)
            self.train_sampler = WindowSampler(data.train, cfg.block_size, cfg.seed)
            self.val_sampler = WindowSampler(data.val, cfg.block_size, cfg.seed)
            self.data_summary = (f"{len(data.train):,} training tokens, {len(data.val):,} validation tokens"
                                 f"{' (from the cache)' if data.from_cache else ''}")
        else:
            from chat_tui.train.dataset import RowSampler

            # a resumed run restarts from its own folder (same network, same tokenizer), not from --from.
            # Only the network comes across, not the source's config keys: an import's
            # untrained_token_ids lapses, since fine-tuning trains the chat tokens.
            source, tokenizer, defaults = load_model(self.out if self.resume else cfg.init_from, device="cpu")
            self.tokenizer = tokenizer
            model_config = GPTConfig(**{**asdict(source.config), "dropout": cfg.dropout})
            cfg.block_size = model_config.block_size
            model = GPT(model_config)
            model.load_state_dict(source.state_dict())
            del source
            data = _rank0_first(self.d, lambda: prepare_data(cfg, resume=self.resume, tokenizer=tokenizer))
            self.train_sampler = RowSampler(data.train_ids, data.train_mask, cfg.seed)
            self.val_sampler = RowSampler(data.val_ids, data.val_mask, cfg.seed)
            self.data_summary = (f"{data.conversations:,} conversations in {len(data.train_ids):,} training and "
                                 f"{len(data.val_ids):,} validation rows"
                                 f"{f'; {data.truncated} cut to the context' if data.truncated else ''}"
                                 f"{' (from the cache)' if data.from_cache else ''}")
        self.defaults = defaults
        self.token_bytes = torch.from_numpy(np.asarray(data.token_bytes, dtype=np.float64))
        self.model = model.to(device)
        self.model.train()
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = flops_per_token(model.config, self.n_params)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step = 0
        self.elapsed = 0.0
        self.tokens = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.saved_step: int | None = None
        self.stopping = False
        if self.resume:
            self._load_state()
        if self.resume:
            self._restore_rng()
        else:
            torch.manual_seed(cfg.seed + self.d.rank)  # dropout masks differ per process
        loss_model: torch.nn.Module = self.model  # GPT.forward: the loss with the logits
        if cfg.compile:
            loss_model = torch.compile(loss_model)
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            loss_model = DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None,
                             gradient_as_bucket_view=True)
        self.loss_model = loss_model
        self.batches = _Batches(self.train_sampler, cfg, self.d, device)
        # the same validation rows however the global batch is split (processes, accumulation)
        self._eval_rows = self.val_sampler.fixed_rows(cfg.eval_iters * self.batches.global_rows, cfg.seed)

    def _load_state(self) -> None:
        state = read_train_state(self.out)
        saved = TrainConfig.from_dict(state["config"])
        if saved.kind != self.cfg.kind:
            raise TrainingError(f"{self.out}: holds a {saved.kind} run, not a {self.cfg.kind} run")
        try:
            self.model.load_state_dict({**state["model"], "lm_head.weight": state["model"]["transformer.wte.weight"]})
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TrainingError(f"{self.out / STATE_FILE}: does not match this run ({first_line(exc)})") from None
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self.tokens = int(state["tokens"])
        finite = [v if isinstance(v, float) and math.isfinite(v) else None
                  for v in (state.get("best_val_loss"), state.get("val_loss"))]
        self.best_val, self.last_val = finite  # a NaN saved by an older version is no best to beat
        self.saved_step = self.step
        self._rng_states = state["rng"]

    def _restore_rng(self) -> None:
        states = self._rng_states
        if len(states) == self.d.world:
            _set_rng_state(states[self.d.rank], self.device)
        else:  # resumed on another number of processes: the data is the same, dropout masks are not
            torch.manual_seed(self.cfg.seed + self.d.rank + self.step)

    # -- the parts of a step --

    def _all_reduce(self, values: list[float]) -> list[float]:
        if not self.d.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def _train_step(self, started: float) -> tuple[float, float]:
        """One optimiser step. Afterwards every process agrees on self.elapsed and self.stopping."""
        cfg = self.cfg
        time_fraction = (self.elapsed / cfg.time_budget) if cfg.time_budget else None
        lr = lr_at(self.step, cfg, time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = None
        accum = cfg.grad_accum
        for micro, (x, y, m) in enumerate(self.batches.step(self.step)):
            sync = nullcontext()
            if self.d.enabled and micro < accum - 1:
                sync = self.loss_model.no_sync()
            with sync, self.autocast:
                _, loss, _ = self.loss_model(x, y, loss_mask=m)
            (loss / accum if accum > 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if cfg.grad_clip > 0:
            norm = clip_grad_norm(self.params, cfg.grad_clip)
        else:
            norm = torch.zeros(())
        elapsed = time.perf_counter() - started
        loss_sum, norm_f, stop, elapsed = self._all_reduce(
            [float(total) / accum, float(norm), 1.0 if self.stop.is_set() else 0.0, elapsed])
        loss_f = loss_sum / self.d.world
        norm_f = norm_f / self.d.world
        self.elapsed = elapsed / self.d.world
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss became {loss_f}" if not math.isfinite(loss_f) else f"gradient norm became {norm_f}"
            raise self._diverged(what, self.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.stopping = stop > 0
        return loss_f, lr

    def _diverged(self, what: str, step: int) -> TrainingError:
        """The run stops here; the last saved checkpoint (never one whose numbers were not finite) stays."""
        kept = (f"the last good checkpoint (step {self.saved_step}) is in {self.out}" if self.saved_step
                else "no checkpoint had been saved yet")
        return TrainingError(f"the {what} at step {step}: training stopped; {kept} (try a lower --lr)")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss (nats per token) and bits per byte on the fixed validation rows."""
        self.model.eval()
        ids, mask = self._eval_rows
        rows = np.arange(len(ids))[self.d.rank :: self.d.world]
        nats = tokens = nbytes = 0.0
        B = max(self.cfg.batch_size, 1) * 4
        for start in range(0, len(rows), B):
            pick = rows[start : start + B]
            x, y, m = to_tensors(ids[pick], None if mask is None else mask[pick], self.device)
            with self.autocast:
                losses = token_losses(self.model(x)[0], y).double()
            weight = (y >= 0).double() if m is None else m.double()
            nats += float((losses * weight).sum())
            tokens += float(weight.sum())
            nbytes += float((self.token_bytes.to(losses.device)[y.clamp(min=0)] * weight).sum())
        self.model.train()
        nats, tokens, nbytes = self._all_reduce([nats, tokens, nbytes])
        loss = nats / max(tokens, 1.0)
        bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
        return loss, bpb

    def _save(self, entry: dict | None = None) -> None:
        """OUT/ as a complete checkpoint, then OUT/train_state.pt; rank 0 writes, others wait."""
        # weights that stopped being finite are never saved over the last good checkpoint
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            raise self._diverged("weights became inf or nan", self.step)
        rng = [_rng_state(self.device)]
        if self.d.enabled:
            import torch.distributed as dist

            gathered: list = [None] * self.d.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        error = None
        if self.d.main:
            try:
                extra = {"trained_by": f"chat-tui train {self.cfg.kind}", "step": self.step,
                         "val_loss": self.last_val, "best_val_loss": self.best_val}
                save_checkpoint(self.out, self.model, self.tokenizer, self.defaults, extra_config=extra)
                state = {
                    "version": STATE_VERSION,
                    "config": self.cfg.to_dict(),
                    "step": self.step,
                    "elapsed_s": self.elapsed,
                    "tokens": self.tokens,
                    "val_loss": self.last_val,
                    "best_val_loss": self.best_val,
                    "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k != "lm_head.weight"},
                    "optimizer": self.optimizer.state_dict(),
                    "rng": rng,
                    "world": self.d.world,
                }
                buffer = io.BytesIO()
                torch.save(state, buffer)
                atomic_write_bytes(self.out / STATE_FILE, buffer.getvalue())
            except OSError as exc:
                error = f"could not save the checkpoint in {self.out}: {exc.strerror or exc}; the last good one (step {self.saved_step}) is kept"
        if self.d.enabled:
            box = [error]
            import torch.distributed as dist

            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise TrainingError(error)
        self.saved_step = self.step

    def _save_best(self) -> None:
        if self.d.main:
            try:
                save_checkpoint(self.out / BEST_DIR, self.model, self.tokenizer, self.defaults,
                                extra_config={"trained_by": f"chat-tui train {self.cfg.kind}", "step": self.step,
                                              "val_loss": self.best_val})
            except OSError as exc:
                self.log(f"warning: could not save the best checkpoint: {exc.strerror or exc}")

    def _status(self, state: str, message: str = "") -> None:
        if not self.d.main:
            return
        try:
            _write_json(self.out / STATUS_FILE, {
                "state": state, "step": self.step, "max_steps": self.cfg.max_steps, "time_budget_s": self.cfg.time_budget,
                "saved_step": self.saved_step, "best_val_loss": self.best_val, "message": message, "pid": os.getpid(),
                "updated": time.time(),
            })
        except OSError:
            pass

    def _open_metrics(self):
        path = self.out / METRICS_FILE
        if self.resume and path.exists():  # drop what was logged after the checkpoint we resume from
            keep = [row for row in read_metrics(self.out) if row.get("step", 0) <= self.step]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
            return path.open("a", encoding="utf-8")
        return path.open("w", encoding="utf-8")

    # -- the run --

    def run(self) -> TrainResult:
        self._setup()
        cfg = self.cfg
        metrics = self._open_metrics() if self.d.main else None
        self._status("running")
        self.log(f"model: {self.n_params:,} parameters ({self.model.config.n_layer} layers, {self.model.config.n_head} heads, "
                 f"{self.model.config.n_embd} wide, context {self.model.config.block_size}); "
                 f"tokenizer: {self.tokenizer.vocab_size} tokens; device: {self.device}"
                 f"{f' x {self.d.world} processes' if self.d.enabled else ''}")
        self.log(f"data: {self.data_summary}")
        if self.resume:
            self.log(f"resuming at step {self.step}")
        if cfg.max_steps is None and cfg.time_budget is None:
            cfg.max_steps = TrainConfig.defaults(cfg.kind).max_steps
        history: list[dict] = []
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.d.world * cfg.block_size
        last_loss = None
        reason = "done"
        save_every = cfg.save_every or cfg.eval_every
        started = time.perf_counter() - self.elapsed
        interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0
        try:
            while True:
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    break
                if cfg.time_budget is not None and self.elapsed >= cfg.time_budget:
                    reason = "time budget"
                    break
                if self.stopping or (not self.d.enabled and self.stop.is_set()):
                    reason = "interrupted"
                    break
                last_loss, lr = self._train_step(started)
                self.tokens += tokens_per_step
                interval_tokens += tokens_per_step
                final = (cfg.max_steps is not None and self.step >= cfg.max_steps) or (
                    cfg.time_budget is not None and self.elapsed >= cfg.time_budget)
                do_eval = self.step % cfg.eval_every == 0 or final
                if not self.d.enabled and self.stop.is_set():
                    self.stopping = True  # asked during this step: log it, save, stop
                if self.step % cfg.log_every == 0 or do_eval or self.stopping or self.step == 1:
                    now = time.perf_counter()
                    rate = interval_tokens / max(now - interval_start - paused, 1e-9)
                    entry = {"step": self.step, "loss": round(last_loss, 6), "lr": lr, "tokens": self.tokens,
                             "tokens_per_s": round(rate, 1), "elapsed_s": round(self.elapsed, 3)}
                    if cfg.max_steps is not None:
                        per_step = self.elapsed / max(self.step, 1)
                        entry["eta_s"] = round(per_step * (cfg.max_steps - self.step), 1)
                    if cfg.time_budget is not None:
                        left = max(0.0, cfg.time_budget - self.elapsed)
                        entry["eta_s"] = round(min(left, entry.get("eta_s", left)), 1)
                    entry["gflops"] = round(rate * self.flops_per_token / 1e9, 2)
                    if do_eval:
                        t_eval = time.perf_counter()
                        val_loss, bpb = self.evaluate()
                        if not math.isfinite(val_loss):  # never "good", never "best": stop before it is saved
                            raise self._diverged(f"validation loss became {val_loss}", self.step)
                        self.last_val = val_loss
                        entry["val_loss"] = round(self.last_val, 6)
                        entry["val_bpb"] = round(bpb, 6)
                        if self.best_val is None or self.last_val < self.best_val:
                            self.best_val = self.last_val
                            entry["best"] = True
                            self._save_best()
                        now = time.perf_counter()
                        paused += now - t_eval
                    history.append(entry)
                    if metrics is not None:
                        metrics.write(json.dumps(entry) + "\n")
                        metrics.flush()
                    if self.on_metrics is not None:
                        self.on_metrics(entry)
                    interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0
                if not self.d.enabled and self.stop.is_set():
                    self.stopping = True  # asked during this step's logging (e.g. by on_metrics)
                if (self.step % save_every == 0 and not final) or self.stopping:
                    t_save = time.perf_counter()
                    self._save()
                    self._status("running")
                    paused += time.perf_counter() - t_save
            if self.saved_step != self.step:
                self._save()
        except TrainingError as exc:
            self._status("failed", str(exc))
            raise
        except BaseException as exc:
            self._status("failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if metrics is not None:
                metrics.close()
        self._status("interrupted" if reason == "interrupted" else "done")
        return TrainResult(self.out, self.step, reason, last_loss, self.last_val, self.best_val, self.elapsed,
                           self.tokens, history)


def train(cfg: TrainConfig, **kwargs) -> TrainResult:
    return Trainer(cfg, **kwargs).run()
