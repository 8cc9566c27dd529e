"""The two-stage training loop: checkpoints, resume, logs, outputs.

    from leank.train import TrainConfig, train
    summary = train(TrainConfig(model="smollm2-135m", sparsities=(0.7, 0.8), out="runs/smollm2"))

Outputs in ``cfg.out``: ``config.json``, ``log.jsonl`` (one line per step), ``alpha.safetensors``
(stage-1 α, tensor ``alpha``), ``mask-0.70.safetensors`` per target sparsity,
``summary.json`` (losses before/after binarisation on held-out samples, wall times),
``loss.png`` and ``alpha.png``, and ``checkpoints/`` (atomic, every ``checkpoint_every``
steps; a killed run continues bit for bit with ``resume=True``).

Under ``torchrun`` the samples of every step are split over the processes and α's gradient
is all-reduced (:mod:`leank.train.distributed`); only rank 0 writes these files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import atomic_write, atomic_write_json, check_writable_dir, write_error
from ..errors import LeanKError
from ..masks import binarize, hybrid_layers, kv_shape
from ..models import check_device
from .config import GRAPHS_AUTO_PARAMS, TrainConfig, old_sparsity_label, sparsity_label
from .distill import binary_scale, distill_loss
from .distributed import Dist, setup, shard_model, sync_grad

RECOMPUTE_HEADROOM = 0.8  # auto recompute: off while the longest sample peaks below this share of the GPU


class _OutOfMemory(LeanKError):
    """A training sample ran out of GPU memory (the message names the knobs)."""


class _Samples(torch.utils.data.Dataset):
    """Sample ``i`` of a stage is a pure function of (data seed, i): resumable anywhere."""

    def __init__(self, tokenizer, cfg: TrainConfig, seed: int, length: int):
        from ..data.training import TrainDataConfig, TrainSampler

        data_cfg = TrainDataConfig(
            min_length=cfg.min_length,
            max_length=cfg.max_length,
            kinds=cfg.kinds,
            haystacks=cfg.haystacks,
            corpus=cfg.corpus,
            seed=seed,
        )
        self.sampler, self.length = TrainSampler(tokenizer, data_cfg), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = self.sampler.sample_at(index)
        return s.input_ids, s.context_end, s.answer_mask


def _loader(dataset, indices, workers: int):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dist: Dist | None = None):
        self.dist = dist = dist or Dist()
        self.cfg, self.progress = cfg, progress and dist.is_main
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.earlier_seconds: dict[str, float] = {}  # stage -> seconds its steps took in earlier processes
        self.incomplete_seconds: set[str] = set()  # stages whose earlier seconds are not all known
        check_device(cfg.device)  # before dist.device(), which would pick a GPU that does not exist
        dist.on_main(lambda: self._check_out_dir(resume))
        self.device = dist.device(cfg.device)
        self._check_graphs_device()  # before the model loads
        if cfg.batch < dist.world:
            raise LeanKError(
                f"--batch {cfg.batch} is smaller than the {dist.world} processes: each step's samples are split "
                f"over the processes, so use --batch {dist.world} or more (a multiple balances the load)"
            )
        if cfg.fsdp and not dist.enabled:
            raise LeanKError("--fsdp shards the model over torchrun processes: launch with torchrun --nproc_per_node N")
        if cfg.fsdp and cfg.batch % dist.world:
            raise LeanKError(
                f"--fsdp needs --batch to be a multiple of the {dist.world} processes (each forward pass gathers "
                f"the weights from all of them, so all run as many), got {cfg.batch}"
            )
        # A given stage 1 is read (rank 0) before the model loads; its shape is checked once the model's is known.
        self.stage1 = None
        if cfg.stage1_alpha is not None:
            self.stage1 = dist.on_main(lambda: read_stage1(cfg.stage1_alpha, cfg.model))
        from ..models import load_model

        # Rank 0 first: a model converted on first use (smollm2-135m) is converted once.
        # With FSDP the full model is loaded on the CPU and fully_shard moves each rank's shard to its device.
        load_device = torch.device("cpu") if cfg.fsdp else self.device
        self.model, self.tokenizer = dist.main_first(lambda: load_model(cfg.model, device=load_device, dtype=cfg.dtype))
        self.model.requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.max_length > limit:
            raise LeanKError(
                f"max_length {cfg.max_length} exceeds the model's maximum context {limit}: lower --max-length"
            )
        self.shape = kv_shape(self.model.config)
        if self.shape[2] % cfg.alignment:
            raise LeanKError(f"alignment {cfg.alignment} does not divide head_dim {self.shape[2]}: use e.g. 16")
        if cfg.stage1_alpha is not None:
            dist.on_main(self._check_stage1_shape)
        if cfg.fsdp:
            shard_model(self.model, self.device)
        self.region = self._static_region()
        # Before the run directory holds a run: a context that does not fit leaves nothing to resume.
        self.recompute = bool(cfg.recompute)  # settled by the memory check when None (auto)
        self.memory_check = self.check_memory()
        if dist.is_main:
            atomic_write_json(self.out / "config.json", cfg.to_dict())

    def _static_region(self):
        """The CUDA-graph passes (``cfg.cuda_graphs``; None: auto, see :class:`TrainConfig`), or None."""
        from .graphs import StaticRegion, unsupported

        cfg = self.cfg
        if cfg.cuda_graphs is None:
            one_gpu = self.device.type == "cuda" and not self.dist.enabled
            params = sum(p.numel() for p in self.model.parameters())
            if not (one_gpu and params < GRAPHS_AUTO_PARAMS and unsupported(self.model) is None):
                return None
        elif not cfg.cuda_graphs:
            return None
        return StaticRegion(self.model, sink=cfg.sink, recent=cfg.recent, capture=True, max_prompt=cfg.max_length)

    def _check_graphs_device(self) -> None:
        """An explicit ``--cuda-graphs`` needs one CUDA GPU and one process (checked before the model loads)."""
        if self.cfg.cuda_graphs and (self.device.type != "cuda" or self.dist.enabled):
            raise LeanKError("--cuda-graphs needs one CUDA GPU and one process (not --device cpu, not torchrun)")

    def _check_out_dir(self, resume: bool) -> None:
        """Rank 0, before anything is written: the corpus is readable, ``out`` is writable, and
        a run already there is resumed only with ``resume`` and the same settings."""
        if self.cfg.corpus:  # a bad corpus must not leave a run directory behind
            from ..data.text import load_corpus

            load_corpus(self.cfg.corpus)
        check_writable_dir(self.out)
        saved = self.out / "config.json"
        if not saved.exists():
            return
        if not resume:
            raise LeanKError(f"{self.out} already holds a run: pass --resume to continue it or choose another --out")
        old = json.loads(saved.read_text())
        new = self.cfg.to_dict()
        diff = [k for k in TrainConfig.RESUME_KEYS if json.dumps(old.get(k)) != json.dumps(new.get(k))]
        if diff:
            raise LeanKError(
                f"cannot resume {self.out}: it was started with different {', '.join(diff)} "
                "(use the same settings or another --out)"
            )
        # An older trainer named stage 2 of a target like 0.855 "stage2-0.85" (two decimals): resuming its run would
        # start that stage 2 over, or continue another target's from it. Its checkpoints do not record their target.
        for s in old.get("sparsities") or ():
            old_label, label = old_sparsity_label(s), sparsity_label(s)
            path = self.ckpt_dir / f"stage2-{old_label}.pt"
            if old_label != label and path.exists() and "sparsity" not in torch.load(path, weights_only=True):
                raise LeanKError(
                    f"cannot resume {self.out}: an older LeanK wrote its stage 2 of sparsity {s} as "
                    f"'stage2-{old_label}' (this one names it 'stage2-{label}'); start it again in another --out"
                )
        # A killed run can leave atomic_write's temporaries (.NAME.XXXX.tmp) behind: not results, remove them.
        for directory in (self.out, self.ckpt_dir):
            for tmp in directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _check_stage1_shape(self) -> None:
        shape = tuple(self.stage1[0].shape)
        if shape != tuple(self.shape):
            raise LeanKError(f"--stage1-alpha {self.cfg.stage1_alpha} holds α of shape {shape}, but {self.cfg.model} "
                             f"needs {tuple(self.shape)} (layers, KV heads, head_dim)")

    # ---- logging ------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        path = self.out / "log.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(path, e) from None

    def _truncate_log(self, stage: str, after_step: int) -> None:
        """Drop log lines a killed run wrote after its last checkpoint (they are redone)."""
        path = self.out / "log.jsonl"
        if not self.dist.is_main or not path.exists():
            return
        lines = []
        for ln in path.read_text().splitlines():
            try:
                record = json.loads(ln)
            except ValueError:  # a line torn by a kill mid-write: only the last can be, after the checkpoint
                continue
            if not (record["stage"] == stage and record["step"] > after_step):
                lines.append(ln)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines)))

    # ---- one stage ----------------------------------------------------------------
    def run_stage(
        self,
        stage: str,
        init: torch.Tensor,
        *,
        steps: int,
        lr: float,
        reg: float,
        sparsity: float | None,
        data_seed: int,
    ) -> torch.Tensor:
        cfg, dist = self.cfg, self.dist
        ckpt = self.ckpt_dir / f"{stage}.pt"
        alpha = init.clone().to(self.device, torch.float32).requires_grad_(True)
        opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
        start, began = 0, time.perf_counter()
        # Only rank 0 reads the checkpoint; α and the optimiser state go to the others from it.
        state = torch.load(ckpt, map_location="cpu", weights_only=True) if dist.is_main and ckpt.exists() else None
        state = dist.broadcast_object(state)
        if state is not None:
            with torch.no_grad():
                alpha.copy_(state["alpha"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
            if state.get("sparsity", sparsity) != sparsity:  # (never, with labels that tell targets apart)
                raise LeanKError(f"{ckpt} holds stage 2 of sparsity {state['sparsity']}, not {sparsity}")
            # the seconds earlier processes spent on this stage's steps; incomplete when a checkpoint of an older
            # LeanK (without them) was resumed on the way
            self.earlier_seconds[stage] = state.get("seconds") or 0.0
            if "seconds" not in state or not state.get("seconds_complete", True):
                self.incomplete_seconds.add(stage)
        with torch.no_grad():
            dist.broadcast(alpha)
        if start >= steps:
            return alpha.detach()
        self._truncate_log(stage, start - 1)
        dataset = _Samples(self.tokenizer, cfg, data_seed, steps * cfg.batch)
        # Step s uses samples s·batch … s·batch + batch − 1; this rank takes its share of each step's.
        mine = set(dist.share(cfg.batch))
        indices = [i for i in range(start * cfg.batch, steps * cfg.batch) if i % cfg.batch in mine]
        batches = iter(_loader(dataset, indices, cfg.workers))
        bar = tqdm(range(start, steps), desc=stage, disable=not self.progress, initial=start, total=steps)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr * cfg.lr_factor(step, steps)
            opt.zero_grad(set_to_none=True)
            if sparsity is None:
                scale, empty = alpha, None
            else:
                scale, empty = binary_scale(alpha, sparsity, cfg.alignment)
            distill = 0.0
            for _ in dist.share(cfg.batch):
                ids, context_end, answer_mask = next(batches)
                loss = self._sample_loss(ids, int(context_end), answer_mask, scale, empty, backward_over=cfg.batch,
                                         retain_graph=sparsity is not None)
                distill += loss.item()
            distill = sync_grad(dist, alpha, distill)
            penalty = reg * alpha.mean()
            if reg:
                penalty.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            soft_sparsity = (
                (alpha < 0.5).float().mean().item() if sparsity is None else 1 - scale.detach().mean().item()
            )
            record = {
                "stage": stage,
                "step": step,
                "loss": distill + penalty.item(),
                "distill": distill,
                "reg": penalty.item(),
                "sparsity": soft_sparsity,
                "mean_alpha": alpha.mean().item(),
                "lr": opt.param_groups[0]["lr"],
            }
            self._log(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                distill=f"{distill:.4f}",
                reg=f"{record['reg']:.4f}",
                sparsity=f"{soft_sparsity:.2f}",
                refresh=False,
            )
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                seconds = self.earlier_seconds.get(stage, 0.0) + time.perf_counter() - began
                self._save_checkpoint(ckpt, alpha, opt, step + 1, sparsity, seconds)
        return alpha.detach()

    def _sample_loss(self, ids, context_end, answer_mask, scale, empty, *, backward_over: int | None = None,
                     retain_graph: bool = False) -> torch.Tensor:
        """The sample's distillation loss; with ``backward_over`` = n, loss / n, backpropagated.
        Running out of GPU memory, in the forward or the backward pass, is one LeanKError naming the knobs."""
        ids = ids.to(self.device)[None]
        try:
            loss = distill_loss(
                self.model,
                ids,
                context_end,
                answer_mask.to(self.device),
                scale,
                sink=self.cfg.sink,
                recent=self.cfg.recent,
                empty_heads=empty,
                checkpoint=self.recompute,
                region=self.region,
            )
            if backward_over is not None:
                loss = loss / backward_over
                loss.backward(retain_graph=retain_graph)
                loss = loss.detach()  # the graph (kept by retain_graph in stage 2) goes with the last reference
            return loss
        except torch.cuda.OutOfMemoryError:
            cuda = self.device.type == "cuda"
            gpu = f" ({torch.cuda.mem_get_info(self.device)[1] / 2**30:.0f} GiB GPU)" if cuda else ""
            raise _OutOfMemory(
                f"out of GPU memory on a {ids.shape[1]}-token sample{gpu}: lower --max-length"
                + ("" if self.recompute else ", or use --recompute")
                + ("" if self.cfg.dtype in ("bfloat16", "bf16", "float16", "fp16") else ", or use --dtype bfloat16")
                + ("" if self.cfg.fsdp or not self.dist.enabled else ", or shard the model with --fsdp")
                + ("" if self.region is None else ", or use --no-cuda-graphs")
            ) from None

    def check_memory(self) -> dict:
        """Before the first step: one forward and backward on a synthetic sample of ``max_length``
        tokens (the longest a run draws), so a context that does not fit fails now, with the knob
        to turn, rather than hours in. Returns the measured peak (CUDA), the seconds it took, and
        whether attention is recomputed in the backward pass.

        ``recompute`` None (auto) settles it here: on one GPU the sample first runs keeping every
        layer's attention activations (faster: SmolLM2's stage-1 step 0.32 → 0.23 s on an H200); if
        it runs out of memory or peaks above :data:`RECOMPUTE_HEADROOM` of the GPU, recomputation is
        switched on (every process's answer counts). On the CPU auto means off; under FSDP, on (a
        process running out of memory mid-forward would leave the others waiting in a collective)."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        if cfg.recompute is not None or not cuda or cfg.fsdp:
            self.recompute = cfg.recompute if cfg.recompute is not None else bool(cuda and cfg.fsdp)
            return dict(self._longest_sample(), recompute=self.recompute)
        self.recompute = False
        try:
            out = self._longest_sample()
            fits = out["peak_gib"] * 2**30 <= RECOMPUTE_HEADROOM * torch.cuda.mem_get_info(self.device)[1]
        except _OutOfMemory:
            out, fits = None, False
        need = not fits
        if self.dist.enabled:  # every process recomputes if one needs to
            need = self.dist.all_reduce_sum(torch.tensor([float(need)], device=self.device)).item() > 0
        if need:
            self.recompute = True
            if self.region is not None:  # the graphs captured without recomputation would keep their memory
                self.region.reset()
            torch.cuda.empty_cache()
            out = self._longest_sample()
        return dict(out, recompute=self.recompute)

    def _longest_sample(self) -> dict:
        cfg = self.cfg
        decode = max(2, min(128, cfg.max_length - cfg.sink - cfg.recent - 1))  # question + answer, generously
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, self.tokenizer.vocab_size, (cfg.max_length,), generator=gen)
        answer = torch.zeros(cfg.max_length, dtype=torch.bool)
        answer[-decode // 2 :] = True
        alpha = torch.ones(self.shape, device=self.device, requires_grad=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for sparsity in (None, max(cfg.sparsities)):  # stage 1, then stage 2's binarised scale
            scale, empty = (alpha, None) if sparsity is None else binary_scale(alpha, sparsity, cfg.alignment)
            self._sample_loss(ids, cfg.max_length - decode, answer, scale, empty, backward_over=1)
        out = {"tokens": cfg.max_length, "seconds": round(time.perf_counter() - t0, 2)}
        if self.device.type == "cuda":
            out["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out

    def _save_checkpoint(self, path: Path, alpha, opt, step: int, sparsity: float | None, seconds: float) -> None:
        if not self.dist.is_main:
            return
        state = {"alpha": alpha.detach().cpu(), "optimizer": opt.state_dict(), "step": step, "sparsity": sparsity,
                 "seconds": seconds, "seconds_complete": path.stem not in self.incomplete_seconds}
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    # ---- validation ---------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, alpha: torch.Tensor, sparsity: float | None) -> float:
        """Mean distillation loss on held-out samples (another data seed), continuous or binarised α.
        Under torchrun each rank evaluates its share of the samples and the sums are all-reduced."""
        dataset = _Samples(self.tokenizer, self.cfg, self.cfg.seed + 10_000, self.cfg.validation_samples)
        scale, empty = (alpha, None) if sparsity is None else binary_scale(alpha, sparsity, self.cfg.alignment)
        share = list(self.dist.share(len(dataset)))
        # FSDP: every rank runs as many forward passes (each gathers weights from all); padding ones count 0.
        passes = -(-len(dataset) // self.dist.world) if self.cfg.fsdp else len(share)
        total = 0.0
        for k in range(passes):
            ids, context_end, answer_mask = dataset[share[k] if k < len(share) else 0]
            loss = self._sample_loss(ids, context_end, answer_mask, scale, empty).item()
            total += loss if k < len(share) else 0.0
        if self.dist.enabled:
            total = self.dist.all_reduce_sum(torch.tensor([total], dtype=torch.float64, device=self.device)).item()
        return total / len(dataset)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run stage 1 then stage 2 for every target sparsity; return the summary (also saved).

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or a process group the caller initialised) the
    processes train together (:mod:`leank.train.distributed`); every rank returns the summary.
    """
    from safetensors.torch import save_file

    check_device(cfg.device)
    dist = setup(cfg.device)
    trainer = Trainer(cfg, resume=resume, progress=progress, dist=dist)
    summary: dict = {"config": cfg.to_dict(), "processes": dist.world, "stages": {}}
    summary["memory_check"] = trainer.memory_check
    summary["cuda_graphs"] = trainer.region is not None  # what auto (None) resolved to
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    t0 = time.perf_counter()
    stage1_info = {k: getattr(cfg, k) for k in STAGE1_KEYS}
    if cfg.stage1_alpha is not None:  # a finished stage 1 given: its α (rank 0's), as stage 1 would have returned it
        given, stage1_info = trainer.stage1 if dist.is_main else (torch.zeros(trainer.shape), None)
        alpha = dist.broadcast(given.to(trainer.device))
        stage1_info = {"stage1_alpha": str(cfg.stage1_alpha), **dist.broadcast_object(stage1_info)}
    else:
        alpha = trainer.run_stage(
            "stage1",
            torch.ones(trainer.shape),
            steps=cfg.stage1_steps,
            lr=cfg.lr1,
            reg=cfg.reg,
            sparsity=None,
            data_seed=cfg.seed,
        )
    alpha_cpu = alpha.cpu().contiguous()
    if dist.is_main:
        atomic_write(
            trainer.out / "alpha.safetensors",
            lambda tmp: save_file({"alpha": alpha_cpu}, tmp, metadata={
                "model": cfg.model, **{k: str(v) for k, v in stage1_info.items()}}),
        )
    hist = torch.histc(alpha_cpu, bins=10, min=0, max=1).tolist()
    summary["stages"]["stage1"] = {
        "seconds": round(trainer.earlier_seconds.get("stage1", 0.0) + time.perf_counter() - t0, 1),
        **({} if cfg.stage1_alpha is None else {"given": str(cfg.stage1_alpha)}),
        "mean_alpha": alpha_cpu.mean().item(),
        "alpha_histogram_10_bins": hist,
        "validation_distill": trainer.validation_loss(alpha, None),
    }
    for index, sparsity in enumerate(cfg.sparsities):
        t1 = time.perf_counter()
        label = sparsity_label(sparsity)
        name = f"stage2-{label}"
        before = trainer.validation_loss(alpha, sparsity)
        final = trainer.run_stage(
            name, alpha, steps=cfg.stage2_steps, lr=cfg.lr2, reg=0.0, sparsity=sparsity, data_seed=cfg.seed + 1 + index
        )
        after = trainer.validation_loss(final, sparsity)
        # every rank has the same (all-reduced) losses, so every rank makes the same choice; a NaN after
        # stage 2 never wins, a NaN before it always loses
        from_stage2 = cfg.stage2_keep == "last" or not (after > before or math.isnan(after))
        source = "stage 2" if from_stage2 else "stage 1"
        mask = binarize(
            (final if from_stage2 else alpha).cpu(),
            sparsity=sparsity,
            alignment=cfg.alignment,
            method="leank",
            model=cfg.model,
            layers=hybrid_layers(trainer.model.config),
            sink=cfg.sink,
            recent=cfg.recent,
            info={
                **stage1_info,  # this run's stage-1 settings, or those recorded with a given α
                "stage2_steps": cfg.stage2_steps,
                "lr2": cfg.lr2,
                "lengths": [cfg.min_length, cfg.max_length],
                "validation_distill": after if from_stage2 else before,
                "alpha_from": source,
                "torch": torch.__version__,
            },
        )
        if dist.is_main:
            mask.save(trainer.out / f"mask-{label}.safetensors")
        summary["stages"][name] = {
            "seconds": round(trainer.earlier_seconds.get(name, 0.0) + time.perf_counter() - t1, 1),
            "validation_distill_binarised_before": before,
            "validation_distill_after": after,
            "mask_from": source,
            "sparsity": mask.sparsity,
            "stage1_binarised_sparsity": mask.sparsity if not from_stage2 else binarize(
                alpha.cpu(), sparsity=sparsity, alignment=cfg.alignment, layers=hybrid_layers(trainer.model.config)
            ).sparsity,
            "fully_pruned_heads": mask.fully_pruned_heads,
            "heads_by_kept_count": mask.count_histogram(),
        }
    # A resumed run counts the seconds earlier processes spent on steps up to their last checkpoint (not their
    # model loads, validation passes or steps after it); "seconds_complete" is false when a checkpoint of an
    # older LeanK did not record them.
    summary["seconds_total"] = round(sum(trainer.earlier_seconds.values()) + time.perf_counter() - t0, 1)
    summary["resumed"] = bool(trainer.earlier_seconds)
    summary["seconds_complete"] = not trainer.incomplete_seconds
    if cuda:
        summary["gpu"] = torch.cuda.get_device_name(trainer.device)
        summary["peak_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2)
    if dist.is_main:
        atomic_write_json(trainer.out / "summary.json", summary)
        from .plots import plot_run

        alpha_path = trainer.out / "alpha.safetensors"
        if not plot_run(trainer.out, load_alpha(alpha_path) if alpha_path.exists() else None):
            print("note: plots skipped: matplotlib is not installed (pip install 'leank[plots]')", file=sys.stderr)
    return summary


STAGE1_KEYS = ("stage1_steps", "reg", "lr1", "seed", "min_length", "max_length")  # recorded with α


def read_stage1(path: str | Path, model: str) -> tuple[torch.Tensor, dict]:
    """A finished stage 1 (``--stage1-alpha``): its α (fp32, CPU) and the settings recorded with it
    (``STAGE1_KEYS``; files written before they were recorded have none). Refuses, in one line, a
    path that is not such a file or whose recorded model is not ``model``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LeanKError(f"--stage1-alpha {path}: no such file (give the alpha.safetensors of a training run)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            alpha = f.get_tensor("alpha") if "alpha" in names else None
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise LeanKError(f"--stage1-alpha {path}: not a safetensors file ({e})") from None
    if alpha is None:
        raise LeanKError(f"--stage1-alpha {path} holds no tensor 'alpha' ({', '.join(sorted(names)) or 'none'}): "
                         "give the alpha.safetensors of a training run, not a mask")
    if meta.get("model") not in (None, model):
        raise LeanKError(f"--stage1-alpha {path} holds the stage-1 α of model {meta['model']!r}, not {model!r}")
    if not alpha.is_floating_point() or not torch.isfinite(alpha).all():
        raise LeanKError(f"--stage1-alpha {path}: α must be finite floating-point values, got {alpha.dtype}")
    return alpha.float().clamp(0.0, 1.0), {k: meta[k] for k in STAGE1_KEYS if k in meta}


def load_alpha(path: str | Path) -> torch.Tensor:
    """Read ``alpha.safetensors`` (tensor ``alpha``, float ``[L, H, D]``)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["alpha"]
    except Exception as e:
        raise LeanKError(f"cannot read α from {path}: {e}") from None
