"""The student worker: one rank holding the trainable model, its AdamW optimiser and the colocated
rollout engine (the `hf` engine generates with this very module, so rollouts always use the
current weights). With several ranks the model is sharded with FSDP2 and the update is data
parallel (opcd/workers/distributed.py).

Update (method.md §2): one optimiser step per training step over all micro-batches; AdamW with
weight decay, gradient-norm clipping, and a step whose gradient norm is not finite is skipped (the
optimiser state is left untouched) and reported as `actor/skipped`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from opcd.runtime import gpu_memory
from opcd.runtime.devices import worker_device
from opcd.models import load_causal_lm, load_tokenizer
from opcd.loss.objective import per_token_loss
from opcd.protocol import Generation, SamplingParams, UpdateBatch
from opcd.rollout.engines import make_rollout
from opcd.rollout.hf import HFRollout
from opcd.workers import checkpoint_io
from opcd.workers import distributed as D
from opcd.workers.scoring import Scorer
from opcd.workers.spec import TrainSpec, WorkerSpec


class StudentWorker:
    def __init__(self, spec: WorkerSpec, train: TrainSpec, rank: int = 0, world_size: int = 1, rendezvous=None):
        torch.set_num_threads(spec.num_threads or os.cpu_count() or 1)
        self.spec, self.train = spec, train
        self.rank, self.world_size = rank, world_size
        self.device = worker_device()
        if world_size > 1:
            D.init_process_group(rendezvous, rank, world_size, self.device)
        self.tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
        on_gpu = self.device.type == "cuda"
        mixed = on_gpu and spec.dtype != "float32"
        # On GPU: fp32 master weights computed in `dtype` (FSDP2 mixed precision with several ranks,
        # autocast with one): AdamW steps of lr ~1e-6 on 16-bit weights round away to nothing.
        self.model = load_causal_lm(spec.model_path, "float32" if on_gpu else spec.dtype, spec.trust_remote_code,
                                    spec.attn_implementation)
        autocast = functools.partial(torch.autocast, "cuda", dtype=getattr(torch, spec.dtype)) \
            if mixed and world_size == 1 else contextlib.nullcontext
        if world_size > 1:  # fully_shard moves the shards to the device (or keeps them on CPU with offload)
            D.shard(self.model, getattr(torch, spec.dtype) if mixed else None, spec.cpu_offload,
                    train.activation_checkpointing)
        else:
            self.model.to(self.device)
            if train.activation_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # fused: one kernel over all parameters; measured 5x faster than the default loop on CPU
        fused = not (world_size > 1 and spec.cpu_offload)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                           fused=fused)
        self.rollout = make_rollout(spec, self.model, self.tokenizer, self.device, autocast)
        self.pad_id = self.tokenizer.pad_token_id
        self.scorer = Scorer.for_model(self.model, spec.lm_head_chunk_size, spec.padding_free, spec.temperature,
                                       self.pad_id, self.device, autocast)
        self.token_loss = functools.partial(per_token_loss, train.kl_loss_type, train.support_mode)

    # -- rollout ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        """This rank's share of a rollout (WorkerGroup.generate splits the prompts)."""
        return self.rollout.generate(prompts, params, seed)

    def sync_rollout(self) -> None:
        """Hand the updated weights to the rollout engine (free for `hf`: it is the training module)."""
        if isinstance(self.rollout, HFRollout):
            return
        # every rank's engine gets the full weights, gathered tensor by tensor on every rank
        # (in the engine's dtype: each rank casts its shard before the gather)
        self.rollout.sync_weights(D.full_tensors(self.model, getattr(torch, self.spec.dtype))
                                  if self.world_size > 1 else self.model.state_dict().items())

    def gpu_memory(self) -> dict[str, float]:
        """Peak GPU memory since the previous call (opcd/runtime/gpu_memory.py); {} on CPU."""
        return gpu_memory.read_and_reset()

    # -- update ----------------------------------------------------------------------------------
    def update(self, batch: UpdateBatch) -> dict[str, float]:
        if hasattr(self.rollout, "sleep"):
            self.rollout.sleep()  # colocated vLLM on GPU frees its memory for the update (woken by the sync)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "entropy": 0.0, "student_mass": 0.0, "teacher_mass": 0.0}
        normalizer = batch.num_tokens if self.train.aggregation == "token_mean" else batch.num_sequences
        if batch.share is not None and not batch.prompt_ids:  # no row here: weight-0 passes on one token
            batch = batch.one_token()
        batch = batch.unpacked()
        if batch.share is not None:  # the driver sent this rank's rows only
            mine, steps = D.share_micro_batches(batch.share, self.spec.micro_batch_size, self.spec.micro_batch_tokens)
        else:
            mine, steps = D.plan_rank_micro_batches(batch.prompt_ids, batch.response_mask, self.rank,
                                                    self.world_size, self.spec.micro_batch_size,
                                                    self.spec.micro_batch_tokens)
        for index in range(steps):
            chunk = mine[index] if index < len(mine) else []
            weight = 1.0 if chunk else 0.0  # a rank short of data still joins the collectives
            mb_loss, mb_stats = self._micro_batch_loss(batch, chunk or [0], normalizer)
            # FSDP2 averages gradients over ranks; the loss is a share of the whole step's mean: undo it
            (mb_loss * (weight * self.world_size)).backward()
            sums["loss"] += mb_loss.item() * weight
            for key, value in mb_stats.items():
                sums[key] += value * weight
        sums = D.all_reduce_sum(sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        tokens = max(batch.num_tokens, 1)
        return {"loss": sums["loss"], "entropy": sums["entropy"] / tokens,
                "student_mass": sums["student_mass"] / tokens, "teacher_mass": sums["teacher_mass"] / tokens,
                "grad_norm": grad_norm, "skipped": float(skipped), "lr": self.optimizer.param_groups[0]["lr"]}

    def _micro_batch_loss(self, batch: UpdateBatch, rows: list[int], normalizer: int):
        index = torch.tensor(rows, dtype=torch.long)
        on_device = {"non_blocking": True, "device": self.device}
        trained = batch.trained_mask[index].to(**on_device)
        support_mask = None if batch.support_mask is None else batch.support_mask[index].to(**on_device)
        return self.scorer.loss(self.model, [batch.prompt_ids[i] for i in rows], batch.response_ids[index],
                                batch.response_mask[index], trained, batch.support_ids[index].to(**on_device),
                                batch.teacher_logprobs[index].to(**on_device), support_mask, self.token_loss,
                                self.train.aggregation, normalizer)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: str, export: bool = False) -> dict[str, str]:
        """This rank's part of a checkpoint (opcd/workers/checkpoint_io.py); -> checksums of its files."""
        return checkpoint_io.save(self.model, self.optimizer, self.tokenizer, folder, self.rank, self.world_size,
                                  export)

    def load(self, folder: str, optimizer: bool = True) -> None:
        """Restore this rank's model (and optimiser) from a checkpoint and hand the weights to the rollout
        engine, so the first rollout after any load samples from them."""
        configured = [(group["lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        checkpoint_io.load(self.model, self.optimizer, folder, self.world_size, optimizer)
        # The saved optimiser state carries the saved run's lr and weight decay; the configured ones win
        # (a resume refuses a changed value unless trainer.resume_override names it: opcd/runs/folder.py).
        for group, (lr, weight_decay) in zip(self.optimizer.param_groups, configured):
            group["lr"], group["weight_decay"] = lr, weight_decay
        # A vLLM engine was built from model.path on disk: without this it would sample (and record its
        # top-k support) from the initial weights until the next update's sync.
        self.sync_rollout()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            return D.full_state_dict(self.model)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

