"""Train a SPoT backbone (or the patch-grid baseline) on the shards, with atomic checkpoints and resume."""
from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spot.core.devices import autocast_for, resolve_device, to_device
from spot.core.model import SPoTViT
from spot.core.priors import sample_positions
from spot.data.decoded import Decoded, rank_rows, train_rows
from spot.data.geometry import overlay
from spot.data.loading import class_names
from spot.training.backbones import Spec, build, describe, load_backbone, save_backbone
from spot.training.checkpoint import fingerprint, load_checkpoint, load_state, save_checkpoint
from spot.utils import live
from spot.utils.io import atomic_path, read_json, remove_temporary, write_json
from spot.utils.progress import progress
from spot.utils.records import digest


def batch_positions(step: int, seed: int, batch: int, model: SPoTViT, tokens: str, priors: list[str],
                    token_range: tuple[int, int]) -> torch.Tensor:
    """The step's token positions: a prior and a count drawn from (seed, step) alone, so a resumed
    run draws exactly what an uninterrupted one does. tokens='grid': random patch subsets only."""
    rng = random.Random(seed * 1_000_003 + step)
    lo, hi = token_range
    n = rng.randint(lo, min(hi, model.num_tokens))
    prior = "grid" if tokens == "grid" else rng.choice(priors)
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return sample_positions(prior, batch, n, *model.img_size, k=model.k, generator=gen)


def epoch_batches(data: Decoded, order: np.ndarray, batch_size: int, n: int, start: int, device) -> Iterator:
    """Batches `start` to `n` of an epoch whose rows are `order`, starting the rows over if they run
    out first: DDP ranks hold different shards (so different row counts) but must take the same
    number of steps."""
    if len(order) == 0:
        raise ValueError("a training rank got no train shards: write at least as many train shards as "
                         "processes (data.images_per_shard)")
    per_pass = -(-len(order) // batch_size)
    while start < n:
        first = start % per_pass
        stop = min(per_pass, first + n - start)
        yield from data.batches("train", batch_size, order=order[first * batch_size:stop * batch_size], device=device)
        start += stop - first


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def validate(model: SPoTViT, data: Decoded, rows: np.ndarray, device, budget: int) -> dict:
    """Val top-1 on the full grid and with `budget` isotropic tokens over val `rows` (summed over all
    ranks under DDP)."""
    model.eval()
    hits, hits_sparse, n = 0, 0, 0
    for b in data.batches("val", 256, order=rows, device=device):
        x, y = b.images.to(device), b.labels.to(device)
        hits += (model(x).argmax(1) == y).sum().item()
        pos = sample_positions("isotropic", len(y), budget, *model.img_size, k=model.k).to(device)
        hits_sparse += (model(x, pos).argmax(1) == y).sum().item()
        n += len(y)
    if torch.distributed.is_initialized():        # each DDP rank saw its own val shards: sum them
        counts = torch.tensor([hits, hits_sparse, n], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        hits, hits_sparse, n = counts.tolist()
    model.train()
    return {"val_top1": hits / max(n, 1), f"val_top1_{budget}tok": hits_sparse / max(n, 1)}


def train(name: str, spec: Spec, tokens: str, tcfg: dict, shards_dir: Path, decoded_dir: Path, out_dir: Path,
          checkpoint_dir: Path, *, init: Path | None = None, seed: int = 0, device: str = "auto",
          resume: bool | None = None, max_steps: int | None = None) -> dict:
    """Train backbone `name` on the images of `decoded_dir` (the decode stage's arrays of the shards
    in `shards_dir`, for the model's geometry) and save it to `out_dir` (the `fetch` format, plus
    metrics.csv/json).

    spec: the backbone's `spot.training.backbones.Spec` (timm model, create_model kwargs, e.g.
    img_size, patch_size, embed_dim, depth, num_heads, the head counting the shards' `class_names`;
    its data config keys), or fine-tuning from the backbone folder `init`. tcfg: the `train` section
    (epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing, grad_clip, token_range,
    priors, checkpoint_every). Each step draws a prior from `priors` and a token count from
    `token_range` (tokens 'grid': the plain-ViT baseline on random patch subsets). AdamW,
    warm-up + cosine per step, label smoothing, gradient clipping, bf16 autocast on CUDA, DDP when
    launched by torchrun (WORLD_SIZE > 1). Checkpoints go atomically to `checkpoint_dir` every epoch
    and every `checkpoint_every` steps, tied to this run's fingerprint: `resume` None continues one
    of the same fingerprint (mid-epoch too) and starts over from another, True stops on another,
    False ignores it. `max_steps` stops early (for tests). Returns the final metrics.
    """
    priors, token_range, batch_size = list(tcfg["priors"]), tuple(tcfg["token_range"]), tcfg["batch_size"]
    manifest = read_json(Path(shards_dir) / "manifest.json")
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    else:
        rank, world = 0, 1
    device = resolve_device(device)
    torch.manual_seed(seed)
    if init is not None:
        model = load_backbone(init)
        timm_name, arch = model.meta["timm_name"], model.meta["model_kwargs"]
    else:
        timm_name, arch = spec.model, spec.kwargs(len(class_names(manifest, shards_dir)))
        model = SPoTViT(build(timm_name, arch, pretrained=False))
    model.data_config = overlay(model.data_config, spec.data_config)
    model.to(device).train()
    steps_per_epoch = math.ceil(manifest["splits"]["train"]["count"] / (batch_size * world))
    total = tcfg["epochs"] * steps_per_epoch
    total = total if max_steps is None else min(max_steps, total)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    made_by = fingerprint(timm_name=timm_name, arch=arch, tokens=tokens, init=digest_file(init), seed=seed,
                          world=world, data=digest(manifest["splits"]["train"]), max_steps=max_steps,
                          train={k: v for k, v in tcfg.items() if k != "checkpoint_every"}, data_config=spec.data_config)
    ckpt = Path(checkpoint_dir) / "checkpoint.pt"
    if rank == 0:
        remove_temporary(ckpt.parent)            # a killed run's half-written checkpoint (this job holds the backbone)
    step, history = 0, []
    state = None if resume is False else load_checkpoint(ckpt, made_by, required=bool(resume))
    if state is not None:
        load_state(model, state["model"], ckpt)
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
    live.start_series(step)               # MLflow step series: a resumed run keeps its points up to `step`
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    data = Decoded(decoded_dir, model.data_config)
    train_spans, val_rows = data.rows("train"), rank_rows(data.rows("val"), rank, world)

    def checkpoint():
        if rank == 0:
            save_checkpoint(ckpt, model_state=model.state_dict(), optimizer_state=opt.state_dict(), step=step,
                            history=history, fingerprint=made_by)

    bar = progress(total=total, initial=step, desc=f"train {name}", unit="step", disable=rank != 0)
    while step < total:
        epoch, done = divmod(step, steps_per_epoch)
        losses, hits, seen = [], 0, 0
        order = train_rows(train_spans, seed, epoch, rank, world)
        for b in epoch_batches(data, order, batch_size, steps_per_epoch, done, device):   # from `done`: a resume
            if step >= total:
                break
            x, y = b.images.to(device), to_device(b.labels, device)
            pos = to_device(batch_positions(step, seed + rank, len(y), model, tokens, priors, token_range), device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, int(tcfg["warmup_epochs"] * steps_per_epoch), tcfg["lr"])
            with autocast_for(device):
                logits = net(x, pos)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=tcfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            opt.step()
            step += 1
            losses.append(loss.item())
            hits += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            live.log_metrics({"train/loss": loss.item(), "train/acc": (logits.argmax(1) == y).float().mean().item(),
                                  "train/lr": opt.param_groups[0]["lr"]}, step=step)
            if step % tcfg["checkpoint_every"] == 0:
                checkpoint()
        if step % steps_per_epoch == 0 or step >= total:
            row = dict(epoch=epoch, step=step, train_loss=float(np.mean(losses)) if losses else float("nan"),
                       train_acc=hits / max(seen, 1), **validate(model, data, val_rows, device, token_range[0]))
            history.append(row)
            live.log_metrics(row, step=step)   # per epoch: train/epoch_loss, train/epoch_acc, val/top1, ...
            checkpoint()
    bar.close()
    if rank == 0:
        meta = describe(model, name, timm_name, arch, source="train", data_config_set=spec.data_config, tokens=tokens,
                        init=str(init) if init else None, seed=seed, steps=step)
        save_backbone(model, out_dir, meta)
        write_csv(Path(out_dir) / "metrics.csv", history)
        write_json(Path(out_dir) / "metrics.json", dict(history[-1]) if history else {})
    if ddp:
        torch.distributed.destroy_process_group()
    return dict(history[-1]) if history else {}


def digest_file(path: Path | None) -> str | None:
    """sha256 of an init backbone's weights (None without one): a checkpoint fine-tuned from other
    weights is another run's."""
    return None if path is None else hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of equal keys as CSV, atomically."""
    import pandas as pd
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
