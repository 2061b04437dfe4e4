"""Training speed and quality against nanoGPT's documented CPU configuration.

nanoGPT's README, "I only have a macbook" (shakespeare_char on a CPU):
character tokenizer, first 90% train / last 10% validation, 4 layers, 4 heads, 128 wide, exact GELU,
context 64, batch 12, 2,000 steps, lr 1e-3 decaying (cosine) to 1e-4 over 2,000 steps, warm-up
100, dropout 0, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, evaluation every 250 steps
on 20 batches. nanoGPT reaches validation loss 1.886 in 143 s on a 2-core machine like ours.
Targets: validation loss <= 1.89, in <= 0.75 x nanoGPT's time on the same machine.

    python benchmarks/bench_train.py [--data PATH] [--steps 2000] [--nproc N] [--threads N] [--compile]
                                     [--reference] [--profile STEPS]

--data is tiny Shakespeare (nanoGPT's data/shakespeare_char/prepare.py downloads it as input.txt);
without it, ../shared/data/tinyshakespeare.txt beside the repository, where CI-like machines keep it.

Ours runs as a user would: `chat-tui train pretrain …` (one process, torch's threads: every core),
timed from the command's start (imports, data preparation, every evaluation and checkpoint
included) to its exit. `--nproc N` runs N processes of one thread each instead (DDP over gloo; the
global batch stays 12): on this 2-core machine that is slower (300 steps: 60-67 ms a step against
55-59 ms for one process with two threads, and 10 s of start-up against 4), gloo's all-reduce of
the 3.2 MB of gradients costing more than a second thread's matmuls do.

--reference also runs a line-for-line replica of nanoGPT's train.py/model.py loop (bias=False,
exact GELU, unfused AdamW, torch.stack batches, train+val estimate_loss, loss.item() every step)
in the same process, so the time ratio is measured on this machine under the same load.
--profile STEPS prints where each millisecond of one of our steps goes (torch.profiler).
The machine's fp32 matmul peak is measured in the same run, so GFLOP/s reads against it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

NANOGPT_TIME_S = 143.0
NANOGPT_VAL = 1.886
# where CI-like machines keep the text; a clone of the repository alone has no copy
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
GET_DATA = "nanoGPT's data/shakespeare_char/prepare.py downloads it as input.txt"


def config(data: Path, out: Path, steps: int, compile_: bool, activation: str = "gelu"):
    from chat_tui.train.loop import TrainConfig

    return TrainConfig(kind="pretrain", data=[str(data)], out=str(out), tokenizer="char", n_layer=4, n_head=4, n_embd=128,
                       block_size=64, dropout=0.0, activation=activation, batch_size=12, grad_accum=1, lr=1e-3, min_lr=1e-4, warmup=100,
                       max_steps=steps, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                       eval_every=max(1, steps // 8), eval_iters=20, log_every=max(1, steps // 20), seed=1337,
                       device="cpu", compile=compile_)


def matmul_peak(seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of a large square matmul (all threads), measured now."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


@torch.no_grad()
def full_val_loss(model, val: np.ndarray, block_size: int) -> float:
    """Mean loss over every non-overlapping window of the validation split (no sampling noise)."""
    from chat_tui.engine.model import token_losses

    model.eval()
    n = (len(val) - 1) // block_size
    ids = torch.from_numpy(np.asarray(val[: n * block_size + 1], dtype=np.int64))
    x = ids[:-1].view(n, block_size)
    y = ids[1:].view(n, block_size)
    total = 0.0
    for i in range(0, n, 256):
        total += float(token_losses(model(x[i : i + 256])[0], y[i : i + 256]).double().sum())
    return total / (n * block_size)


def run_ours(data: Path, steps: int, compile_: bool, nproc: int, log, activation: str = "gelu") -> dict:
    """`chat-tui train pretrain` with nanoGPT's configuration, as a user runs it (N processes x 1 thread)."""
    import subprocess

    from chat_tui.engine.checkpoint import load_model
    from chat_tui.train.dataset import prepare_pretrain
    from chat_tui.train.loop import read_metrics

    if 12 % nproc:
        raise SystemExit("--nproc must divide the batch of 12")
    base = Path(tempfile.mkdtemp(prefix="bench-train-"))
    out = base / "run"  # the data cache goes beside it, inside base
    cfg = config(data, out, steps, compile_, activation)
    argv = [sys.executable, "-m", "chat_tui", "train", "pretrain", "--data", str(data), "--out", str(out),
            "--tokenizer", "char", "--activation", activation, "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
            "--dropout", "0", "--batch-size", str(12 // nproc), "--lr", "1e-3", "--min-lr", "1e-4", "--warmup", "100",
            "--max-steps", str(steps), "--weight-decay", "0.1", "--grad-clip", "1", "--eval-every", str(cfg.eval_every),
            "--eval-iters", "20", "--log-every", str(cfg.log_every), "--seed", "1337", "--device", "cpu"]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    else:
        argv += ["--threads", str(torch.get_num_threads())]
    if compile_:
        argv.append("--compile")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        env.pop("OMP_NUM_THREADS")
    try:
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=None if log else subprocess.DEVNULL, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"training failed with status {done.returncode}")
        rows = read_metrics(out)
        model = load_model(out)[0]
        val_data = prepare_pretrain([data], tokenizer_kind="char", block_size=64, cache_root=out.parent / ".chat-tui-data-cache").val
        full = full_val_loss(model, val_data, 64)
        last = rows[-1]
        return {"val": last["val_loss"], "full_val": full, "wall": wall, "loop": last["elapsed_s"],
                "tokens": last["tokens"], "n_params": sum(p.numel() for p in model.parameters())}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- nanoGPT, as its train.py and model.py do it (for a same-machine time reference) ------------------------


class _LayerNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class _Attn(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.n_head, self.n_embd = h, c

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = _LayerNorm(c), _Attn(c, h), _LayerNorm(c)
        self.c_fc, self.gelu, self.c_proj = nn.Linear(c, 4 * c, bias=False), nn.GELU(), nn.Linear(4 * c, c, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class _NanoGPT(nn.Module):
    def __init__(self, vocab, block, layers, heads, c):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.h = nn.ModuleList([_Block(c, heads) for _ in range(layers)])
        self.ln_f = _LayerNorm(c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def run_reference(data: Path, steps: int, log) -> dict:
    text = data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    train_data, val_data = ids[:n], ids[n:]
    block, batch, eval_iters, eval_interval = 64, 12, 20, max(1, steps // 8)
    torch.manual_seed(1337)

    def get_batch(split):
        d = train_data if split == "train" else val_data
        ix = torch.randint(len(d) - block, (batch,))
        x = torch.stack([torch.from_numpy((d[i : i + block]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((d[i + 1 : i + 1 + block]).astype(np.int64)) for i in ix])
        return x, y

    model = _NanoGPT(len(chars), block, 4, 4, 128)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))

    def get_lr(it):
        if it < 100:
            return 1e-3 * it / 100
        ratio = (it - 100) / (steps - 100)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * 9e-4

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                losses[k] = model(*get_batch(split))[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    t0 = time.perf_counter()
    X, Y = get_batch("train")
    val = None
    for it in range(steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        if it % eval_interval == 0:
            val = estimate_loss()["val"]
            log(f"  reference step {it:>5}  val {val:.4f}  {time.perf_counter() - t0:.1f}s")
        if it == steps:
            break
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return {"val": val, "wall": time.perf_counter() - t0}


def profile_steps(data: Path, steps: int, nproc: int) -> None:
    """Where the milliseconds of one process's training step go (its batch: 12 / nproc sequences)."""
    from torch.profiler import ProfilerActivity, profile

    from chat_tui.train.loop import Trainer

    base = Path(tempfile.mkdtemp(prefix="bench-train-prof-"))
    try:
        cfg = config(data, base / "run", 10_000, False)
        cfg.batch_size = 12 // nproc
        trainer = Trainer(cfg)
        trainer._setup()
        for _ in range(10):
            trainer._train_step(time.perf_counter())
        t = time.perf_counter()
        for _ in range(steps):
            trainer._train_step(time.perf_counter())
        plain = (time.perf_counter() - t) / steps * 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                trainer._train_step(time.perf_counter())
        print(f"\none step of one process ({cfg.batch_size} x 64 tokens, {torch.get_num_threads()} thread(s)): "
              f"{plain:.2f} ms without the profiler; per step, by operator (self time):")
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows)
        print(f"  {'operator':<52} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
        for e in rows[:22]:
            print(f"  {e.key[:52]:<52} {e.self_cpu_time_total / 1000 / steps:>8.3f} "
                  f"{100 * e.self_cpu_time_total / total:>5.1f}% {e.count / steps:>10.1f}")
        rest = sum(e.self_cpu_time_total for e in rows[22:])
        print(f"  {'(everything else)':<52} {rest / 1000 / steps:>8.3f} {100 * rest / total:>5.1f}%")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help=f"tiny Shakespeare (default: {DEFAULT_DATA} when it exists; {GET_DATA})")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation", choices=("gelu", "gelu_tanh"), default="gelu",
                        help="ours: nanoGPT's exact GELU (default) or GPT-2's tanh form, chat-tui's own default")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes, 1 thread each (default 1: one process with --threads)")
    parser.add_argument("--reference", action="store_true", help="also time the nanoGPT replica on this machine")
    parser.add_argument("--reference-threads", type=int, default=None,
                        help="torch threads for the replica (default: torch's, as nanoGPT runs)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="profile this many steps")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.data is None and not DEFAULT_DATA.is_file():
        parser.exit(2, f"bench_train.py: error: no {DEFAULT_DATA}: pass --data PATH/TO/tinyshakespeare.txt ({GET_DATA})\n")
    args.data = args.data or DEFAULT_DATA
    if not args.data.is_file():
        parser.exit(2, f"bench_train.py: error: {args.data}: no such file ({GET_DATA})\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads here, "
          f"load average {load:.2f} at start")
    peak = matmul_peak()
    print(f"fp32 matmul peak (1024^3, measured now): {peak:.1f} GFLOP/s")
    if args.profile:
        profile_steps(args.data, args.profile, args.nproc)
        return
    ours = run_ours(args.data, args.steps, args.compile, args.nproc, None if args.quiet else log, args.activation)
    ref = None
    if args.reference:
        threads = torch.get_num_threads()
        if args.reference_threads:
            torch.set_num_threads(args.reference_threads)
        ref = run_reference(args.data, args.steps, log)
        ref["threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
    end_load = os.getloadavg()[0]
    from chat_tui.engine.model import GPTConfig
    from chat_tui.train.loop import flops_per_token

    fpt = flops_per_token(GPTConfig(vocab_size=70, block_size=64, n_layer=4, n_head=4, n_embd=128), ours["n_params"])
    scale = args.steps / 2000
    rows = [
        ("validation loss (20 batches, as nanoGPT)", f"{ours['val']:.4f}", f"{NANOGPT_VAL:.3f}", "<= 1.89"),
        ("validation loss (whole validation split)", f"{ours['full_val']:.4f}", "", ""),
        ("wall time, whole run (s)", f"{ours['wall']:.1f}", f"{NANOGPT_TIME_S * scale:.0f} (README)",
         f"<= {0.75 * NANOGPT_TIME_S * scale:.0f}"),
        ("training loop time (s)", f"{ours['loop']:.1f}", "", ""),
        ("ms per step (loop time / steps, evaluations included)", f"{1000 * ours['loop'] / args.steps:.1f}",
         f"{1000 * NANOGPT_TIME_S / 2000:.1f}", ""),
        ("tokens/s (training loop)", f"{ours['tokens'] / ours['loop']:,.0f}",
         f"{2000 * 12 * 64 * scale / (NANOGPT_TIME_S * scale):,.0f}", ""),
        ("achieved GFLOP/s (model FLOPs)", f"{ours['tokens'] * fpt / ours['loop'] / 1e9:.1f}", "", f"peak {peak:.1f}"),
    ]
    if ref is not None:
        rows += [(f"nanoGPT replica here ({ref['threads']} thread(s)): val / wall (s)",
                  f"{ref['val']:.4f} / {ref['wall']:.1f}", "", ""),
                 ("our loop time / replica's", f"{ours['loop'] / ref['wall']:.2f}", "", ""),
                 ("our wall time / replica's", f"{ours['wall'] / ref['wall']:.2f}", "", "<= 0.75")]
    print(f"\nload average {load:.2f} at start, {end_load:.2f} at end ({os.cpu_count()} cores)")
    print(f"{'':<50} {'chat-tui':>14} {'nanoGPT':>16} {'target':>10}")
    for name, a, b, c in rows:
        print(f"{name:<50} {a:>14} {b:>16} {c:>10}")


if __name__ == "__main__":
    main()
