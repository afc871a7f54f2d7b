"""One training run on several processes (ranks): what the training loop asks of its fellow ranks.

torchrun (`python -m torch.distributed.run`) starts the ranks and sets up torch's process group (gloo on the CPU,
NCCL on CUDA; finetune/distributed_rank.py is what each rank runs, finetune/distributed_launch.py starts them).
Inside the loop, `Ranks.current()` says which rank this is; with no process group it is the one-process run and
every method below is a no-op, so finetune/train.py has one code path.

Data parallel is DDP's arithmetic: every rank starts from rank 0's trainable weights (broadcast, as DDP's
constructor does), trains its share of each step's micro-batches and the gradients are summed across ranks once
per optimizer step (DDP with no_sync() over the accumulation). The gradients are all-reduced here rather than by
the DistributedDataParallel wrapper because the loss path calls the model's body and output layer apart
(finetune/fastloss.py), which DDP's forward hooks would not see. Sharding the frozen base (FSDP2,
`torch.distributed.fsdp.fully_shard`) is for a base that fits no single GPU: FSDP reduces those gradients itself.

What makes the run mean the same thing whatever the world size (docs/distributed.md):
- one optimizer step is `grad_accum x world_size` micro-batches taken from one order of the data that every rank
  computes alike (same seed, DistributedSampler semantics); rank r trains micro-batches r, r + world, ...;
- the loss is divided by the step's learned tokens summed over every rank, and the gradients are summed, so the
  step equals the one-process step over the same micro-batches (up to the order of float additions);
- the step counter, the learning-rate schedule, evaluation and early stopping are the global step's: every rank
  evaluates the same held-out rows with the same weights and so stops at the same step. Rank 0 alone reports,
  saves checkpoints and writes the adapter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# A plan's "parallel" key: how a multi-rank run splits the work.
DATA_PARALLEL = "ddp"  # the whole model on every rank, the data split
SHARDED = "fsdp"  # the frozen base sharded across ranks (FSDP2), the data split too


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> Ranks:
        """This process's place in the run: the process group's when torchrun started one, else the single rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def my_share(self, micro_batches: list) -> list:
        """This rank's micro-batches of a step taken in order by every rank: r, r + world, r + 2 world, ..."""
        return micro_batches[self.rank :: self.world_size]

    def sum(self, *values: float) -> tuple[float, ...]:
        """The values summed over every rank (in float64, so token counts stay exact)."""
        if not self.distributed:
            return tuple(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tuple(float(v) for v in tensor.cpu())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: a cancel seen by one rank stops them all at the same step."""
        if not self.distributed:
            return bool(flag)
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def broadcast_parameters(self, params) -> None:
        """Every rank starts from rank 0's trainable weights, as DDP's constructor makes them."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                if not _is_dtensor(p):
                    dist.broadcast(p.data, src=0)

    def sync_gradients(self, params) -> None:
        """Sums the gradients of the trainable parameters over every rank: one all-reduce per optimizer step, in
        fp32 buckets. Parameters FSDP shards (DTensors) were reduced by FSDP in backward and are left alone."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        plain = [p for p in params if not _is_dtensor(p)]
        for bucket in _buckets(plain):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in bucket:
                piece = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
                if p.grad is None:
                    if not bool(piece.any()):
                        continue  # no rank produced a gradient for it: left as a one-process run leaves it
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(piece)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


BUCKET_ELEMENTS = 25 * 1024 * 1024 // 4  # DDP's default bucket, 25 MiB of fp32


def _buckets(params):
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def shard_frozen_base(model, ranks: Ranks) -> None:
    """FSDP2: each decoder layer, then the whole model, becomes a `fully_shard` unit, so a rank holds 1/world of
    the base. Gradients are summed, not averaged (the loss is already divided by the global token count); they
    are reduce-scattered after every micro-batch, which costs a little speed under accumulation and keeps the
    loop the same. Needs CUDA and NCCL; a 4-bit base needs a bf16 quant storage type (autotune plans it)."""
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    if not layers:
        raise RuntimeError("Sharding needs a model whose decoder layers can be found (model.layers).")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    model.set_gradient_divide_factor(1.0)


def _decoder_layers(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return list(getattr(body, "layers", None) or [])


def _fsdp_units(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(_fsdp_units(model))


def gather_whole(model) -> None:
    """Every rank: FSDP-sharded parameters all-gathered whole, so rank 0 can save them (a no-op without FSDP)."""
    for unit in _fsdp_units(model):
        unit.unshard()


def shard_again(model) -> None:
    for unit in _fsdp_units(model):
        unit.reshard()


def prepare_model(model, spec_plan: dict, ranks: Ranks) -> None:
    """Before the optimizer is built: shard the base when the plan says so, else give every rank rank 0's
    trainable weights."""
    if not ranks.distributed:
        return
    if spec_plan.get("parallel") == SHARDED:
        shard_frozen_base(model, ranks)
        return
    ranks.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
