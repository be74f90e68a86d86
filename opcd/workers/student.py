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

from opcd import gpu_memory, lm_head, loss, loss_chunked
from opcd.batching import prompt_response_inputs
from opcd.models import compute_device, load_causal_lm, load_tokenizer
from opcd.objective import per_token_loss
from opcd.protocol import Generation, SamplingParams, UpdateBatch
from opcd.rollout.hf import HFRollout
from opcd.workers import checkpoint_io
from opcd.workers import distributed as D


class StudentWorker:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 attn_implementation: str | None = None, lr: float = 1e-6, weight_decay: float = 0.01,
                 grad_clip: float = 1.0, temperature: float = 1.0, kl_loss_type: str = "full",
                 support_mode: str = "tail", aggregation: str = "token_mean", micro_batch_size: int = 8,
                 num_threads: int = 0, rollout_backend: str = "hf", vllm: dict | None = None, hf: dict | None = None,
                 activation_checkpointing: bool = False, cpu_offload: bool = False, lm_head_chunk_size: int = 512,
                 padding_free: bool | None = None, micro_batch_tokens: int = 0, rank: int = 0, world_size: int = 1,
                 rendezvous=None):
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            D.init_process_group(rendezvous, rank, world_size)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        on_gpu = torch.cuda.is_available()
        mixed = on_gpu and dtype != "float32"
        # On GPU: fp32 master weights computed in `dtype` (FSDP2 mixed precision with several ranks,
        # autocast with one): AdamW steps of lr ~1e-6 on 16-bit weights round away to nothing.
        self.model = load_causal_lm(model_path, "float32" if on_gpu else dtype, trust_remote_code,
                                    attn_implementation)
        self.device = compute_device()
        self._autocast = functools.partial(torch.autocast, "cuda", dtype=getattr(torch, dtype)) \
            if mixed and world_size == 1 else contextlib.nullcontext
        if world_size > 1:  # fully_shard moves the shards to the device (or keeps them on CPU with offload)
            D.shard(self.model, getattr(torch, dtype) if mixed else None, cpu_offload, activation_checkpointing)
        else:
            self.model.to(self.device)
            if activation_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # fused: one kernel over all parameters; measured 5x faster than the default loop on CPU
        fused = not (world_size > 1 and cpu_offload)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
        self.rollout = None
        if rollout_backend == "vllm":  # an engine on every rank, each generating its share of the prompts
            from opcd.rollout.vllm import VLLMRollout

            self.rollout = VLLMRollout(model_path, self.tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
                                       **(vllm or {}))
        else:
            self.rollout = HFRollout(self.model, self.tokenizer, autocast=self._autocast, **(hf or {}))
        self.grad_clip = grad_clip
        self.temperature = temperature
        self.kl_loss_type = kl_loss_type
        self.support_mode = support_mode
        self.aggregation = aggregation
        self.micro_batch_size = micro_batch_size
        self.pad_id = self.tokenizer.pad_token_id
        # chunk > 0: hidden states, the lm_head applied a chunk of tokens at a time (no [tokens, vocab] logits)
        self.lm_head_chunk_size, self.padding_free = lm_head.head_settings(self.model, lm_head_chunk_size,
                                                                           padding_free)
        self.micro_batch_tokens = micro_batch_tokens

    # -- rollout ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        """This rank's share of a rollout (WorkerGroup.generate splits the prompts)."""
        return self.rollout.generate(prompts, params, seed)

    def sync_rollout(self) -> None:
        """Hand the updated weights to the rollout engine (free for `hf`: it is the training module)."""
        if isinstance(self.rollout, HFRollout):
            return
        # every rank's engine gets the full weights, gathered tensor by tensor on every rank
        self.rollout.sync_weights(D.full_tensors(self.model) if self.world_size > 1 else self.model.state_dict().items())

    def gpu_memory(self) -> dict[str, float]:
        """Peak GPU memory since the previous call (opcd/gpu_memory.py); {} on CPU."""
        return gpu_memory.read_and_reset()

    # -- update ----------------------------------------------------------------------------------
    def update(self, batch: UpdateBatch) -> dict[str, float]:
        if hasattr(self.rollout, "sleep"):
            self.rollout.sleep()  # colocated vLLM on GPU frees its memory for the update (woken by the sync)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "entropy": 0.0, "student_mass": 0.0, "teacher_mass": 0.0}
        normalizer = batch.num_tokens if self.aggregation == "token_mean" else batch.num_sequences
        mine, steps = D.plan_rank_micro_batches(batch.prompt_ids, batch.response_mask, self.rank, self.world_size,
                                                self.micro_batch_size, self.micro_batch_tokens)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
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
        prompts = [batch.prompt_ids[i] for i in rows]
        response_ids, response_mask = batch.response_ids[index], batch.response_mask[index]
        on_device = {"non_blocking": True, "device": self.device}
        trained = batch.trained_mask[index].to(**on_device)
        support_mask = None if batch.support_mask is None else batch.support_mask[index].to(**on_device)
        support_ids = batch.support_ids[index].to(**on_device)
        teacher_logprobs = batch.teacher_logprobs[index].to(**on_device)
        if self.lm_head_chunk_size:
            return self._chunked_loss(prompts, response_ids, response_mask, trained, support_ids, teacher_logprobs,
                                      support_mask, normalizer)
        inputs = {k: v.to(self.device) for k, v in
                  prompt_response_inputs(prompts, response_ids, response_mask, self.pad_id).items()}
        width = response_ids.shape[1]
        with self._autocast():
            logits = self.model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1].float()  # [b, T, V]
        student_logprobs = loss.gather_logprobs(logits, support_ids, self.temperature)  # [b, T, K]
        per_token = per_token_loss(self.kl_loss_type, self.support_mode, student_logprobs, teacher_logprobs,
                                   support_mask)  # [b, T]
        mb_loss = loss.aggregate(per_token, trained, self.aggregation, normalizer=normalizer)
        with torch.no_grad():
            mask = trained.float()
            stats = {"entropy": (loss.entropy(logits, self.temperature) * mask).sum().item(),
                     "student_mass": (loss.support_mass(student_logprobs, support_mask) * mask).sum().item(),
                     "teacher_mass": (loss.support_mass(teacher_logprobs, support_mask) * mask).sum().item()}
        return mb_loss, stats

    def _chunked_loss(self, prompts, response_ids, response_mask, trained, support_ids, teacher_logprobs,
                      support_mask, normalizer):
        """The same loss and statistics from hidden states (of a padding-free packed row by default),
        only at the trained tokens, the lm_head a chunk of tokens at a time with its gradient computed on
        the way (loss_chunked.fused_support_loss)."""
        with self._autocast():
            hidden = lm_head.response_hidden_states(self.model, prompts, response_ids, response_mask, self.pad_id,
                                                    self.padding_free, self.device)  # [b, T, H]
        head = self.model.get_output_embeddings()
        keep = trained.bool()
        weights = loss.aggregation_weights(trained, self.aggregation, normalizer)[keep]
        mask = None if support_mask is None else support_mask[keep]
        token_loss = functools.partial(per_token_loss, self.kl_loss_type, self.support_mode)
        mb_loss, student_logprobs, entropy = loss_chunked.fused_support_loss(
            hidden[keep], head.weight, support_ids[keep], teacher_logprobs[keep], token_loss, weights,
            self.temperature, self.lm_head_chunk_size, head.bias, mask)
        stats = {"entropy": entropy.sum().item(),
                 "student_mass": loss.support_mass(student_logprobs, mask).sum().item(),
                 "teacher_mass": loss.support_mass(teacher_logprobs[keep], mask).sum().item()}
        return mb_loss, stats

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: str, export: bool = False) -> dict[str, str]:
        """This rank's part of a checkpoint (opcd/workers/checkpoint_io.py); -> checksums of its files."""
        return checkpoint_io.save(self.model, self.optimizer, self.tokenizer, folder, self.rank, self.world_size,
                                  export)

    def load(self, folder: str, optimizer: bool = True) -> None:
        configured = [(group["lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        checkpoint_io.load(self.model, self.optimizer, folder, self.world_size, optimizer)
        # The saved optimiser state carries the saved run's lr and weight decay; the configured ones win
        # (a resume refuses a changed value unless trainer.resume_override names it: opcd/runfolder.py).
        for group, (lr, weight_decay) in zip(self.optimizer.param_groups, configured):
            group["lr"], group["weight_decay"] = lr, weight_decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            return D.full_state_dict(self.model)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

