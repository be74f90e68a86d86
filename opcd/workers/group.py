"""Worker groups: a plain worker class wrapped as Ray actors, one actor per rank.

The driver calls a worker method through its class, `group.gather(StudentWorker.update, ...)`, for the
group's one answer (or `group.call` for every rank's result; a method the worker class lacks is
refused before anything is sent), or `group.generate(prompts, ...)` to have the ranks split a list of
prompts and get one `Generation` back in order. The ranks' results are awaited together
(opcd/workers/waiting.py): the first failure comes back at once as a one-line error naming the group,
the rank that caused it, its node, the call and the cause, then what the other ranks did as a
consequence (a user error raised inside a worker keeps its type, so the CLI prints it the same way as
on the driver). Every actor gets the driver's allow-listed environment (opcd/runtime/envforward.py).
"""

from __future__ import annotations

import logging
import os
import re
import socket

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from opcd.runtime import devices, envforward, faults
from opcd.runtime import raywatch
from opcd.errors import OpcdError, WorkerError
from opcd.runtime.interrupt import handle_sigterm
from opcd.protocol import Generation, RankShares, SamplingParams
from opcd.rollout import concat_generations, prompt_seed
from opcd.workers.waiting import RankFailure, gather_ranks

log = logging.getLogger("opcd")


# Weight-loading progress bars from every worker would bury the driver's own progress bar. (Not
# OMP_WAIT_POLICY=PASSIVE: measured here, sleeping OpenMP threads made decoding ~30% slower, and the
# idle groups' default short spin costs nothing noticeable.)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
RANKS_ON_NODE = "OPCD_RANKS_ON_NODE"  # how many ranks of its group share a rank's node (workers/base.py)


def ranks_on_each_node(world_size: int, pool=None) -> list[int]:
    """For each rank, the ranks of the same group on its node: from the pool's bundle placement when
    known, else all ranks on one node (a local run)."""
    if pool is None or getattr(pool, "nodes", None) is None:
        return [world_size] * world_size
    order = pool.order or tuple(range(world_size))
    nodes = [pool.nodes[order[rank]] for rank in range(world_size)]
    return [nodes.count(node) for node in nodes]


def init_ray(address: str | None, num_cpus: float | None) -> None:
    """Start a local Ray instance (address None) or join a cluster ("auto" / host:port)."""
    if ray.is_initialized():
        return
    if address is None:
        # Logical CPUs, not cores: actors that each hold a whole CPU can starve later tasks on a
        # 2-core machine, and our workers take turns anyway. address="local": a new instance even when a
        # `ray start` on this machine left its address behind (ray.init() would join that cluster).
        ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, 8), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        raywatch.watch(raywatch.local_raylet_pid())  # Ray's agents outlive a SIGKILLed driver
    else:
        ray.init(address=address, log_to_driver=True)
    handle_sigterm()  # ray.init replaced our SIGTERM handler with one that aborts the driver


class WorkerGroup:
    def __init__(self, name: str, worker_cls: type, kwargs: dict, world_size: int = 1,
                 num_cpus: float = 1, num_gpus: float = 0, pool=None, collective_timeout_s: float | None = None,
                 ranks_per_engine: int = 1):
        """`pool` (opcd.workers.placement.Pool): rank r runs on the pool's bundle r; else anywhere with
        `num_cpus`/`num_gpus` free. `collective_timeout_s`: see distributed.collective_timeout_s.
        `ranks_per_engine`: consecutive ranks that form one rollout engine (vLLM tensor parallelism) and
        so take the same share of a `generate`."""
        self.name = name
        self.worker_cls = worker_cls
        self.world_size = world_size
        self.ranks_per_engine = ranks_per_engine
        # False: every rank gets every argument whole, by value (the data plane before rank shares; kept
        # for benchmarks/dataplane.py to measure against)
        self.scatter = True
        self._pad_id = None
        env, secret_env = envforward.split_secrets(envforward.forwarded())
        actor_cls = faults.with_fault(worker_cls, name)
        extra = {}
        if secret_env:  # not in runtime_env, which Ray logs with its values
            actor_cls, extra[envforward.SECRETS_KWARG] = envforward.receiving_secrets(actor_cls), secret_env
        actor_cls = ray.remote(actor_cls)
        if world_size > 1:  # the ranks meet at a store hosted here, on the driver
            from opcd.workers.distributed import Rendezvous

            rendezvous, self._store = Rendezvous.create(name, collective_timeout_s)
            extra["rendezvous"] = rendezvous
        if pool is not None:
            pool.check_engines(ranks_per_engine)
        self.workers = []
        neighbours = ranks_on_each_node(world_size, pool)
        for rank in range(world_size):
            options = pool.actor_options(rank) if pool is not None else {"num_cpus": num_cpus, "num_gpus": num_gpus}
            actor_env = {**env, **WORKER_ENV, **devices.actor_env(options["num_gpus"]),
                         RANKS_ON_NODE: str(neighbours[rank])}
            self.workers.append(actor_cls.options(**options, max_concurrency=1, runtime_env={"env_vars": actor_env})
                                .remote(**kwargs, **extra, rank=rank, world_size=world_size))
        self.nodes: list[str] = []  # each rank's node (see _node), for the failure lines
        self.call("__ray_ready__")  # surface construction errors (e.g. a bad model path) now
        self.nodes = self.call("__ray_call__", _node)
        where = self.call("__ray_call__", _where)
        log.info("worker group %s on %s; environment forwarded: %s", name,
                 ", ".join(f"rank {rank}: {device} on {node}" for rank, (device, node) in enumerate(zip(where, self.nodes))),
                 envforward.describe({**env, **secret_env}))

    def call(self, method, *args, **kwargs) -> list:
        """Run `method`, a function of the worker class (`StudentWorker.save`; Ray's own actor methods
        `__ray_ready__`, `__ray_call__` by name), on every rank. An argument with
        `rank_shares(world_size)` (`UpdateBatch`, `ScoreRequest`) is split: each rank's share is put into
        the object store once and reaches that rank alone. Any other bulky argument is put once too (Ray
        would copy it into every call)."""
        name = self._method_name(method)
        per_rank = [[] for _ in self.workers]
        for arg in args:
            if self.scatter and self.world_size > 1 and hasattr(arg, "rank_shares"):
                for rank, share in enumerate(arg.rank_shares(self.world_size)):
                    per_rank[rank].append(ray.put(share))
            else:
                ref = ray.put(arg) if self.scatter and self.world_size > 1 and _is_bulky(arg) else arg
                for rank_args in per_rank:
                    rank_args.append(ref)
        refs = [getattr(worker, name).remote(*rank_args, **kwargs) for worker, rank_args in zip(self.workers, per_rank)]
        return self._wait(refs, name)

    def _method_name(self, method) -> str:
        if isinstance(method, str) and method.startswith("__ray_"):
            return method
        name = getattr(method, "__name__", None)
        if not callable(method) or getattr(self.worker_cls, name, None) is not method:
            raise TypeError(f"{self.name} group: {method!r} is not a method of {self.worker_cls.__name__}; "
                            f"call through the class, e.g. group.call({self.worker_cls.__name__}.<method>, ...)")
        return name

    def gather(self, method, *args, **kwargs):
        """Run `method` on every rank (with several ranks all must take part: FSDP2 collectives) and
        gather the group's one answer: data-parallel shares (`RankShares`, e.g. teacher scores) put
        back in the batch's order, else rank 0's result (the others hold the same)."""
        results = self.call(method, *args, **kwargs)
        parts = [r for r in results if r is not None]
        if parts and isinstance(parts[0], RankShares):
            return type(parts[0]).from_rank_shares(parts)
        return results[0]

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        """Every engine generates a contiguous share of `prompts` (its first prompt's seed shifts the
        call's seed, so prompt i samples with `prompt_seed(seed, i)` however the prompts are split);
        the shares come back concatenated in the prompts' order. Every rank is called, also those with
        an empty share: an FSDP-sharded `hf` engine's forwards are collectives. The ranks of one
        tensor-parallel engine get its share put once, and only its first rank answers (the others
        hold the same result), packed: real tokens only, int32 ids."""
        engines = self.world_size // self.ranks_per_engine
        bounds = shares(len(prompts), engines)
        refs = []
        for engine, (start, end) in enumerate(bounds):
            share = prompts[start:end] if self.ranks_per_engine == 1 else ray.put(prompts[start:end])
            for rank in range(engine * self.ranks_per_engine, (engine + 1) * self.ranks_per_engine):
                refs.append(self.workers[rank].generate.remote(share, params, prompt_seed(seed, start),
                                                               reply=rank % self.ranks_per_engine == 0, packed=True))
        results = self._wait(refs, "generate")
        parts = [results[engine * self.ranks_per_engine].unpacked() for engine in range(engines)]
        if self._pad_id is None:  # the workers' tokenizer's, asked once
            self._pad_id = self._wait([self.workers[0].__ray_call__.remote(lambda worker: worker.pad_id)], "pad_id")[0]
        return concat_generations(parts, self._pad_id)

    def _wait(self, refs: list, method: str) -> list:
        """Every rank's result of `method`, waited for together (opcd/workers/waiting.py); the first
        failure ends the wait with one line naming its cause's rank and node (a user error raised
        inside a worker keeps its type)."""
        try:
            return gather_ranks(refs)
        except RankFailure as failure:
            root = getattr(failure.error, "cause", None)
            if isinstance(root, OpcdError) and not failure.consequences:
                raise root from None
            raise WorkerError(self._failure_line(failure, method)) from failure.error

    def _failure_line(self, failure: RankFailure, method: str) -> str:
        """The cause first (a dead rank, with its node), then what the other ranks did because of it."""
        line = f"{self.name} worker rank {failure.rank}{self._on_node(failure.rank, failure.error)} " + (
            f"died during {method}: {_death_cause(failure.error)}" if failure.died
            else f"failed in {method}: {_error_line(failure.error)}")
        for rank, error in failure.consequences:
            line += (f"; rank {rank}{self._on_node(rank, error)} also died" if isinstance(error, RayActorError)
                     else f"; rank {rank} failed in {method} as a consequence: {_error_line(error)}")
        return line

    def _on_node(self, rank: int, error: Exception) -> str:
        """The words ' on node ...': the node the rank reported at start-up, else the ip in Ray's death notice."""
        if rank < len(self.nodes):
            return f" on node {self.nodes[rank]}"
        ip = re.search(r"\bip: (\S+)", str(error))
        return f" on node {ip.group(1)}" if ip else ""

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def shares(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous shares of `count` items, sizes differing by at most one
    (the first ones larger)."""
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _is_bulky(arg) -> bool:
    """Worth one object-store copy instead of one copy per call: tensors and batches, not scalars."""
    return isinstance(arg, (torch.Tensor, list, tuple, dict)) or hasattr(arg, "__dataclass_fields__")


def _where(worker) -> str:
    """Run inside an actor: the device its worker computes on."""
    device = getattr(worker, "device", None)
    return devices.describe(device if device is not None else devices.worker_device())


def _node(worker) -> str:
    """Run inside an actor: its node's IP address, host name and Ray node id (short, as `ray status` shows
    it: several nodes can share a host)."""
    node_id = ray.get_runtime_context().get_node_id()
    return f"{ray.util.get_node_ip_address()} ({socket.gethostname()}, Ray node {node_id[:8]})"


def _death_cause(exc: RayActorError) -> str:
    """Why an actor is gone, in one line. Ray's own first line says neither: "The actor died
    unexpectedly before finishing this task." when the process died, and a colourised task header
    when the constructor raised (the exception itself is only in the traceback's last line). Ray does
    not pass on the signal that ended the process (measured with 2.60: a SIGKILL and a crash read the
    same), so the line lists the usual ones."""
    text = str(exc).strip()
    if exc.actor_init_failed:
        error = re.sub(r"^[\w.]+\.(?=\w+: )", "", text.splitlines()[-1])  # "a.b.ModelError: x" -> "ModelError: x"
        return f"its constructor raised {error}"
    if re.search(r"node (has )?died|NODE_DIED|node .* (is )?dead", text, re.IGNORECASE):
        return "its node left the Ray cluster (stopped, lost its network or power)"
    if isinstance(exc, ActorUnavailableError):  # Ray cannot reach it: the process, or its node's Ray, is gone
        return ("it cannot be reached (its process or its node's Ray is gone: killed, out of memory, node stopped "
                "or lost)")
    pid = re.search(r"\bpid: (\d+)", text)
    return (f"its process{f' (pid {pid.group(1)})' if pid else ''} exited unexpectedly (killed by a signal - "
            f"SIGKILL, the out-of-memory killer: see dmesg on that node - or crashed)")


def _error_line(error: Exception) -> str:
    """'Type: last line' of the exception a worker raised (the last line of a multi-line message is
    the one that says what went wrong; long ones are cut)."""
    root = getattr(error, "cause", None) or error
    text = str(root).strip()
    last = text.splitlines()[-1] if text else ""
    return f"{type(root).__name__}: {last[:300]}{'...' if len(last) > 300 else ''}"
