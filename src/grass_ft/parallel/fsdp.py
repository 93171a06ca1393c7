"""FSDP2 in the native loop (``fsdp=true``): each decoder block its own ``fully_shard`` unit, the rest the root's.

Weights, gradients and optimizer state are sharded along dim 0 over the ranks (``torch.distributed.fsdp``'s
per-parameter sharding: every parameter is a ``DTensor`` whose local tensor is this rank's rows). Layer sampling
needs nothing from FSDP2 beyond what it does already: a unit none of whose parameters requires grad produces no
gradient, so FSDP2 reduce-scatters nothing for it (the frozen blocks' gradients are never communicated); a unit
that trains this step reduce-scatters its gradients, averaged over the ranks, into each rank's shard. The bytes
that go into the reduce-scatters are counted by :class:`CountingReduceScatter` (FSDP2's documented
``set_custom_reduce_scatter`` hook), so every step's ``reduce_scatter_bytes`` in metrics.jsonl is measured, not
computed. What GRASS reads from the gradients, the per-block squared norm, is a sum over the shards: each rank
sums its rows and one ``all_reduce`` of a vector of per-block sums gives the full gradient's norms
(:func:`grass_ft.method.importance.sharded_block_rms`). The optimizer
(:class:`~grass_ft.method.offload.LayerwiseOffloadAdamW`) updates each rank's local shard and offloads only
that; checkpoints go through ``torch.distributed.checkpoint`` (:mod:`grass_ft.run.checkpoint`), with the
optimizer's per-rank state re-wrapped as DTensors of the parameters' placement (:func:`optimizer_state_to_dtensors`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.blocks import find_blocks

try:  # FSDP2 with a pluggable reduce-scatter (set_custom_reduce_scatter): recent torch only
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    from torch.distributed.tensor import DTensor
    _MISSING = None
except ImportError as e:  # the one-process and DDP-style paths must still import this module
    FSDPModule = DTensor = ()  # isinstance(x, ()) is False
    DefaultReduceScatter = object
    _MISSING = str(e)


def fsdp_unavailable() -> str | None:
    """Why ``fsdp=true`` cannot run with this torch (None: it can)."""
    if _MISSING is None:
        return None
    return (f"`fsdp` needs torch's FSDP2 with set_custom_reduce_scatter (torch {torch.__version__} lacks it: "
            f"{_MISSING}); upgrade torch or drop fsdp=true")


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, counting the bytes each rank puts in (one unit's padded gradients).

    ``bytes`` accumulates until the caller resets it (the loop does at the start of every step).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.bytes += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def shard_model(model: nn.Module, layers_attribute: str | None = None, mesh=None,
                reduce_dtype: torch.dtype | None = torch.float32) -> CountingReduceScatter:
    """``fully_shard`` every decoder block, then the root (embeddings, final norm, head); in place.

    Returns the counter every unit's reduce-scatter goes through. Needs an initialised process group; ``mesh``
    defaults to FSDP2's (all ranks, on this process's device type). Gradients are reduce-scattered in
    ``reduce_dtype`` (fp32 by default, as the data-parallel path's all-reduce, :func:`grass_ft.parallel.distributed.reduce_dtype`:
    summing bf16 in bf16 rounds every partial sum to 8 bits) and arrive in the parameters' dtype; ``None`` reduces
    in the gradients' own dtype. Parameters are gathered in their own dtype (no ``param_dtype`` cast).
    """
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    _, blocks = find_blocks(model, layers_attribute)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    counter = CountingReduceScatter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(counter)
    return counter


def shard_from_rank0(model: nn.Module, source: nn.Module | None, device: torch.device,
                     layers_attribute: str | None = None) -> CountingReduceScatter:
    """Shard ``model``, built on the ``meta`` device on every rank (:func:`grass_ft.model.empty_model`), and give
    each rank its rows of ``source``: the model as loaded on rank 0's host (None on the other ranks).

    Each block is sharded (:func:`shard_model`), every rank allocates only its shards on ``device``, and rank 0
    broadcasts the weights one tensor at a time, each rank keeping its rows (``set_model_state_dict`` with
    ``broadcast_from_rank0``, torch's own path for this). So the weights are read once, by rank 0, and no device
    ever holds the whole model. The buffers a state dict leaves out (the rotary frequencies) are rank 0's too.
    Returns :func:`shard_model`'s counter.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    counter = shard_model(model, layers_attribute)
    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    theirs = unsaved_buffers(source) if source is not None else {}
    for name, buffer in unsaved_buffers(model).items():
        if source is not None:
            buffer.copy_(theirs[name])
        dist.broadcast(buffer, src=0)
    return counter


def unsaved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict leaves out (``persistent=False``: the rotary frequencies), by name: what a model
    built on the ``meta`` device must be given besides its state dict."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules() for name, buffer in module.named_buffers(recurse=False)
            if name in module._non_persistent_buffers_set}


def reshard(model: nn.Module) -> None:
    """Every unit back to its shards. A forward with no backward after it (an evaluation) can leave units'
    parameters gathered (FSDP2 expects a backward), and the module then holds the gathered tensors, not the
    sharded parameters the optimizer is built on and updates: the first steps after an evaluation before training
    had other gradients without this (tests/test_fsdp.py compares them with one process's)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float: over DTensor gradients it is a replicated DTensor."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# ------------------------------------------------------------------------- optimizer state <-> DTensors


def host_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """``mesh``'s ranks and process groups as a CPU mesh: DTensors on it keep host tensors on the host.

    ``DTensor.from_local`` moves a local tensor onto its mesh's device type, so wrapping the offloaded optimizer's
    host state with the parameters' (CUDA) mesh would copy all of it onto the GPU at once for a checkpoint: about
    39 GB per GPU for LLaMA-2-7B (issue 29). The process groups are the parameters' own, so DCP's plan (each
    shard's offsets, from the mesh coordinate) is the same, and no collective runs on this mesh. A CPU mesh is
    rebuilt too, so that the CPU tests run this path.
    """
    if mesh.ndim == 1:
        return DeviceMesh.from_group(mesh.get_group(), "cpu", mesh.mesh)
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    return DeviceMesh.from_group([mesh.get_group(i) for i in range(mesh.ndim)], "cpu", mesh.mesh,
                                 mesh_dim_names=names)


def optimizer_state_to_dtensors(state: dict, params: dict[str, nn.Parameter]) -> dict:
    """:meth:`LayerwiseOffloadAdamW.state_dict`'s per-rank shards, each wrapped as a DTensor with its parameter's
    placement, so ``torch.distributed.checkpoint`` saves one global tensor per name (and can reshard it); the
    scalar ``step`` stays a plain tensor (the same on every rank). The shards stay where they are, on the host
    (:func:`host_mesh`): DCP writes them from there, and no optimizer state visits the GPU."""
    meshes: dict[int, DeviceMesh] = {}
    out = {}
    for name, entry in state.items():
        p = params[name]
        if id(p.device_mesh) not in meshes:  # one host mesh per parameter mesh (FSDP2: one for all)
            meshes[id(p.device_mesh)] = host_mesh(p.device_mesh)
        mesh = meshes[id(p.device_mesh)]
        out[name] = {k: (DTensor.from_local(v, mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False) if v.dim() > 0 else v)
                     for k, v in entry.items()}
    return out


def optimizer_state_template(layout: dict[str, list[str]], params: dict[str, nn.Parameter]) -> dict:
    """Empty host DTensors of the right placement for every (name, key) a checkpoint holds, for DCP to load into
    (it reads each shard from the file into them, on the host)."""
    empty = {name: {k: (torch.zeros((), dtype=torch.float32) if k == "step"
                        else torch.empty(local(params[name]).shape, dtype=torch.float32)) for k in keys}
             for name, keys in layout.items()}
    return optimizer_state_to_dtensors(empty, params)


def optimizer_state_from_dtensors(state: dict) -> dict:
    """The inverse of :func:`optimizer_state_to_dtensors`: this rank's shards as CPU tensors (no copy: they are
    there already)."""
    return {name: {k: local(v).cpu() for k, v in entry.items()} for name, entry in state.items()}
