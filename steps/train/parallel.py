"""Where a training process stands (Dist), the compute precision, and the model wrapped for
one process, DDP or FSDP2.

Precision: trainable tensors are fp32 masters; on a GPU the frozen base is bf16 and the compute
bf16 (autocast, or FSDP's mixed-precision policy).
"""
from __future__ import annotations

import os


class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self, backend: str = "gloo", *, group_always: bool = False):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # FSDP needs a process group even for one rank (torchrun provides the rendezvous)
        if (self.world > 1 or group_always) and not dist.is_initialized():
            dist.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist
        if self.world > 1:
            dist.barrier()

    def _reduce_device(self):
        return self.device if self.device.type == "cuda" else "cpu"

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        import torch
        import torch.distributed as dist
        if self.world == 1:
            return [value]
        t = torch.zeros(self.world, dtype=torch.float64, device=self._reduce_device())
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_precision(precision: str, device) -> str:
    if precision == "auto":
        import torch
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return precision


def amp_dtype(precision: str):
    """The autocast / FSDP compute dtype of a precision; None for fp32 (no mixed precision)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def whole(t):
    """A tensor as a whole: an FSDP DTensor shard is all-gathered (collective), others as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_model(model, amp_dtype) -> None:
    """FSDP2 in place: each decoder layer is one unit (transformers names them in
    `_no_split_modules`), the root holds the rest (embed_tokens, lm_head and their
    modules_to_save copies). Parameters keep their storage dtype (bf16 frozen, fp32 trainable);
    the mixed-precision policy all-gathers them in the compute dtype and reduces gradients in fp32,
    so no autocast is involved and the residual stream runs in the compute dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None else MixedPrecisionPolicy()
    unit_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in unit_names]
    if not units:
        raise ValueError(f"launcher.strategy=fsdp: {type(model.get_base_model()).__name__} names "
                         "no decoder-layer class (_no_split_modules) to shard by; use strategy ddp")
    for m in units:
        fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def parallelize(model, dist: Dist, *, fsdp: bool, compute_dtype, compile: bool):
    """(net, embed_cast): what forward() is called on (the model sharded in place under FSDP,
    DDP-wrapped for world > 1, compiled on request), and the forward hook that casts the
    embedding output to the compute dtype outside FSDP (None when there is none)."""
    import torch

    embed_cast, net = None, model
    if fsdp:
        if not torch.distributed.is_initialized():
            raise RuntimeError("launcher.strategy=fsdp runs under torchrun (steps.train.launch."
                               "execute starts it); no process group is initialised here")
        shard_model(model, compute_dtype)
    elif compute_dtype is not None:
        # The modules_to_save embedding is an fp32 master copy; autocast would carry its
        # fp32 output through every residual add and RMSNorm. Cast it to the compute
        # dtype as the recipe's fp16 run and a plain bf16 loop do (bench/train_throughput).
        embed_cast = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.to(compute_dtype))
    if not fsdp and dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)
    return net, embed_cast
