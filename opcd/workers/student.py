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

import torch

from opcd.runtime import gpu_memory
from opcd.loss.objective import per_token_loss
from opcd.protocol import Generation, SamplingParams, UpdateBatch
from opcd.rollout.engines import make_rollout
from opcd.workers import checkpoint_io
from opcd.workers import distributed as D
from opcd.workers.base import ModelWorker
from opcd.workers.scoring import LossInputs, Scorer
from opcd.workers.spec import WorkerSpec


class StudentWorker(ModelWorker):
    def __init__(self, spec: WorkerSpec, rank: int = 0, world_size: int = 1, rendezvous=None):
        super().__init__(spec, rank, world_size, rendezvous)
        train = spec.trainer
        mixed = self.device.type == "cuda" and spec.dtype != "float32"
        # On GPU: fp32 master weights computed in `dtype` (FSDP2 mixed precision with several ranks,
        # autocast with one): AdamW steps of lr ~1e-6 on 16-bit weights round away to nothing.
        self.model = self.load_model("float32" if self.device.type == "cuda" else spec.dtype)
        autocast = functools.partial(torch.autocast, "cuda", dtype=getattr(torch, spec.dtype)) \
            if mixed and world_size == 1 else contextlib.nullcontext
        self.place(self.model, getattr(torch, spec.dtype) if mixed else None, spec.model.activation_checkpointing)
        if world_size == 1 and spec.model.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # fused: one kernel over all parameters; measured 5x faster than the default loop on CPU
        fused = not (world_size > 1 and spec.model.cpu_offload)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                           fused=fused)
        self.rollout = make_rollout(spec, self.model, self.tokenizer, self.device, autocast)
        self.scorer = Scorer.for_model(self.model, spec.loss.lm_head_chunk_size, train.padding_free,
                                       spec.rollout.temperature, self.pad_id, self.device, autocast)
        self.token_loss = functools.partial(per_token_loss, spec.kl_loss_type, spec.loss.support_mode)
        self.pending_save = None  # a checkpoint part being written in the background (start_save)

    # -- rollout ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int,
                 reply: bool = True, packed: bool = False) -> Generation | None:
        """This rank's share of a rollout (WorkerGroup.generate splits the prompts). `reply` False: a
        tensor-parallel engine's later ranks, which hold the same result as its first: nothing comes back.
        `packed`: for the way back to the driver, without padding and with int32 ids
        (`WorkerGroup.generate` asks for it and unpacks)."""
        generation = self.rollout.generate(prompts, params, seed)
        if not reply:
            return None
        return generation.packed(self.pad_id) if packed else generation

    def sleep_rollout(self) -> None:
        """After a step's rollout: the engine gives its memory to the teacher's scoring and the update
        (a no-op for an engine that shares this module, and on CPU)."""
        self.rollout.sleep()
        gpu_memory.release_cached()
        self.memory.mark("rollout")

    def sync_rollout(self) -> None:
        """Hand the weights to the rollout engine, waking it in stages: its weights, the sync, the
        trainer's cached blocks back to the device, then its KV cache (free for an engine that shares
        the training module)."""
        if self.rollout.shares_module:
            return
        self.rollout.wake_weights()
        # every rank's engine gets the full weights, gathered tensor by tensor on every rank
        # (in the engine's dtype: each rank casts its shard before the gather)
        self.rollout.sync_weights(D.full_tensors(self.model, getattr(torch, self.spec.dtype))
                                  if self.world_size > 1 else self.model.state_dict().items())
        gpu_memory.release_cached()  # the gather's buffers: the KV cache is allocated outside PyTorch's cache
        self.rollout.wake_cache()
        self.memory.mark("sync")

    # -- update ----------------------------------------------------------------------------------
    def update(self, batch: UpdateBatch) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "entropy": 0.0, "student_mass": 0.0, "teacher_mass": 0.0}
        normalizer = batch.num_tokens if self.spec.loss.aggregation == "token_mean" else batch.num_sequences
        if batch.share is not None and not batch.prompt_ids:  # no row here: weight-0 passes on one token
            batch = batch.one_token()
        batch = batch.unpacked()
        size, budget = self.spec.micro_batching(scoring_only=False)
        if batch.share is not None:  # the driver sent this rank's rows only
            mine, steps = D.share_micro_batches(batch.share, size, budget, padded=not self.scorer.packed)
        else:
            mine, steps = D.plan_rank_micro_batches(batch.prompt_ids, batch.response_mask, self.rank,
                                                    self.world_size, size, budget, padded=not self.scorer.packed)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.trainer.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
        # Gradients are dead weight until the next backward (a full fp32 copy of this rank's shard):
        # freed now, so the engine's KV cache can have their memory when it wakes.
        self.optimizer.zero_grad(set_to_none=True)
        gpu_memory.release_cached()
        self.memory.mark("update")
        tokens = max(batch.num_tokens, 1)
        return {"loss": sums["loss"], "entropy": sums["entropy"] / tokens,
                "student_mass": sums["student_mass"] / tokens, "teacher_mass": sums["teacher_mass"] / tokens,
                "grad_norm": grad_norm, "skipped": float(skipped), "lr": self.optimizer.param_groups[0]["lr"]}

    def _micro_batch_loss(self, batch: UpdateBatch, rows: list[int], normalizer: int):
        index = torch.tensor(rows, dtype=torch.long)
        on_device = {"non_blocking": True, "device": self.device}
        inputs = LossInputs(
            prompts=[batch.prompt_ids[i] for i in rows], response_ids=batch.response_ids[index],
            response_mask=batch.response_mask[index], trained=batch.trained_mask[index].to(**on_device),
            support_ids=batch.support_ids[index].to(**on_device),
            teacher_logprobs=batch.teacher_logprobs[index].to(**on_device),
            support_mask=None if batch.support_mask is None else batch.support_mask[index].to(**on_device))
        return self.scorer.loss(self.model, inputs, token_loss=self.token_loss,
                                aggregation=self.spec.loss.aggregation, normalizer=normalizer)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: str, export: bool = False) -> dict[str, str]:
        """This rank's part of a checkpoint (opcd/workers/checkpoint_io.py); -> checksums of its files."""
        return self.start_save(folder, export)

    def start_save(self, folder: str, export: bool = False, background: bool = False) -> dict[str, str] | None:
        """Begin this rank's part of a checkpoint. -> the checksums of its files once written, or None with
        `background` and several ranks: the shards are copied to host memory and a thread writes them
        while the next steps run, reporting the checksums in the folder (runs/checkpoint.py report_written)."""
        self.finish_save()  # the driver publishes a checkpoint before it starts the next: this does not wait
        background = background and self.world_size > 1
        group = D.checkpoint_group(self.collective_timeout_s) if background else None
        # the export in the model's own dtype: on GPU the weights train as fp32 masters of a bf16 model
        writing = checkpoint_io.start_save(self.model, self.optimizer, self.tokenizer, folder, self.rank,
                                           self.world_size, export, background, group,
                                           export_dtype=getattr(torch, self.spec.dtype))
        if not background:
            return writing.result()
        self.pending_save = writing
        return None

    def finish_save(self) -> str | None:
        """Wait until this rank's background write (if any) has ended. -> None, or its error's line (the
        driver reads the outcome from the rank's report; this answers when the report could not be written)."""
        pending, self.pending_save = self.pending_save, None
        error = pending.exception() if pending is not None else None
        return None if error is None else f"{type(error).__name__}: {error}"

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

