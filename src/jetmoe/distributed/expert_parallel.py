"""Expert parallelism (EP): the experts of every MoE layer (and, as an option, of every MoA layer) split by expert
index over the P ranks of an expert-parallel group; each routed row travels to the rank that holds its expert and
its output travels back, with `all_to_all_single`.

    shard_experts(model, ep_mesh, attention)   expert weights -> DTensors, Shard(0) over the EP mesh (before FSDP)
    expert_shard_placement(params, edp_mesh)   FSDP2's placement of those weights over the expert-data-parallel mesh
    ExpertParallelOps                          the model's `ops_wrapper`: the experts' products where they live
    TokenExchange                              one routing's exchange: split sizes, permutation, local row groups

Layout. With E experts, EP rank g holds experts [g·E/P, (g+1)·E/P) of every sharded `[E, out, in]` weight, and FSDP2
shards that block further over the W/P expert-data-parallel ranks, so the parameter is a DTensor on the 2-D
(expert_data_parallel, expert_parallel) mesh (`jetmoe.distributed.mesh`). A forward all-gathers it over
expert_data_parallel only: to the rank's `[E/P, out, in]` experts (a DTensor with Shard(0) over expert_parallel),
never to all E. State dicts and checkpoints hold the global `[E, out, in]` tensors, so a checkpoint loads at any EP
degree that divides E (DCP reshards by the DTensor placements) and consolidates to the usual HF layout.

Exchange (`TokenExchange`, one per routing) of a rank's M routed rows, sorted by expert:
 1. the rank's per-expert row counts, all-to-all (E/P counts to each rank): every rank learns how many rows each
    source sends to each of its experts;
 2. the split sizes, read on the host (one device synchronisation per exchange, as in torchtitan and Megatron-Core);
 3. the rows, all-to-all with uneven splits (rows sorted by expert are already grouped by destination rank); they
    arrive grouped by (source rank, local expert) and are permuted to (local expert, source rank) order, the row
    groups the experts' products take (grouped GEMM or per-expert loop, exactly as without EP);
 4. the outputs, un-permuted and returned by the reverse all-to-all.
Autograd runs through both all-to-alls (the backward of one is the reverse one), so the gradient of a local expert
weight sums the contributions of every rank's tokens routed to it. The MoE MLP is one exchange for both GLU
projections (`ops.expert_mlp`); a sharded MoA exchanges around each of its two projections (attention runs between
them, on the token's own rank) and reuses the routing's split sizes for the second.

A rank whose rows all go elsewhere sends them all and gets their outputs back; an expert that receives no rows (from
one rank or from all) computes an empty product with a zero weight gradient. Every rank takes part in every
exchange and in every gradient reduce-scatter, whatever the routing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, ShardPlacementResult
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from jetmoe.distributed.mesh import check_expert_parallel
from jetmoe.model import JetMoePreTrainedModel
from jetmoe.model.ops import ReferenceOps
from jetmoe.model.routing import Routing


# ----------------------------------------------------------------------------- sharding


def expert_modules(model: JetMoePreTrainedModel, attention: bool) -> list[nn.Module]:
    """The `ParallelExperts` that expert parallelism shards: every MoE layer's two, and MoA's two with `attention`."""
    modules = []
    for block in model.base_model.layers:
        modules += [block.mlp.input_linear, block.mlp.output_linear]
        if attention:
            modules += [block.self_attention.experts.input_linear, block.self_attention.experts.output_linear]
    return modules


def shard_experts(model: JetMoePreTrainedModel, ep_mesh: DeviceMesh, attention: bool = False) -> set[nn.Parameter]:
    """Split the expert weights (see `expert_modules`) by expert index over `ep_mesh`, as DTensors with Shard(0),
    and route the model's expert products through `ExpertParallelOps`. Call it before `fully_shard`, ideally on
    the meta device (nothing is moved then). Returns the sharded parameters."""
    check_expert_parallel(ep_mesh.size(), experts=model.config.num_local_experts)
    params = set()
    for module in expert_modules(model, attention):
        module.weight = nn.Parameter(distribute_tensor(module.weight, ep_mesh, [Shard(0)]))
        params.add(module.weight)
    model.base_model.ops_wrapper = ExpertParallelOps
    return params


def expert_shard_placement(
    expert_params: set[nn.Parameter], expert_data_mesh: DeviceMesh
) -> Callable[[nn.Parameter], ShardPlacementResult | None]:
    """`fully_shard`'s `shard_placement_fn`: the expert weights sharded over `expert_data_mesh` (dim 0, the local
    experts, when its size divides their number; else dim 1 when that splits evenly; else dim 0 padded), every
    other parameter as FSDP's default (Shard(0) over the data-parallel mesh given to `fully_shard`)."""
    mesh_info = FSDPMeshInfo(expert_data_mesh, shard_mesh_dim=0)
    ranks = expert_data_mesh.size()

    def placement(param: nn.Parameter) -> ShardPlacementResult | None:
        if param not in expert_params:
            return None
        local_experts, out_features = param.to_local().shape[:2]
        dim = 1 if local_experts % ranks and out_features % ranks == 0 else 0
        return ShardPlacementResult(placement=Shard(dim), mesh_info=mesh_info)

    return placement


def average_gradients_over(block: FSDPModule, data_mesh: DeviceMesh, expert_data_mesh: DeviceMesh) -> None:
    """Make FSDP divide every gradient of `block` by the number of data-parallel ranks.

    The objective is the mean of the W ranks' losses. A local expert's gradient already sums its EP group's
    contributions (through the exchange) and FSDP sums it over the W/P expert-data-parallel ranks, so the divisor
    is W, not FSDP's default of the reduce-scatter group's size, W/P. FSDP reduces with a pre-multiplied sum for a
    divisor other than the group's size, which gloo lacks: sum reductions followed by the division work on every
    backend. Not for a group of one rank (EP over all ranks), where FSDP divides its gradient copy by the divisor
    and would divide again after the sum."""
    block.set_gradient_divide_factor(float(data_mesh.size()))
    block.set_force_sum_reduction_for_comms(expert_data_mesh.size() > 1)


# ----------------------------------------------------------------------------- the exchange


class RowGroups:
    """Rows grouped by expert, `counts_E[e]` consecutive rows for expert e: what `ops.expert_linear` reads of a
    routing."""

    def __init__(self, counts_E: torch.Tensor) -> None:
        self.counts_E = counts_E
        self.offsets_E = counts_E.cumsum(0).to(torch.int32)


class TokenExchange:
    """The all-to-all exchange of one routing's rows over an expert-parallel group (module docstring, steps 1-4).

    `counts_E`: this rank's routed rows per (global) expert, in the order of its sorted rows."""

    def __init__(self, counts_E: torch.Tensor, group: dist.ProcessGroup) -> None:
        ranks = dist.get_world_size(group)
        local = counts_E.shape[0] // ranks
        received_E = torch.empty_like(counts_E)
        dist.all_to_all_single(received_E, counts_E, group=group)  # E/P counts to each rank
        received_PL = received_E.view(ranks, local)  # rows from source p for local expert l
        self.send_splits, self.receive_splits = torch.stack([counts_E.view(ranks, local).sum(1),
                                                             received_PL.sum(1)]).tolist()
        self.group = group
        self.groups = RowGroups(received_PL.sum(0))
        self.order_R = self.arrival_R = None  # one local expert: rows arrive in expert order
        if local > 1:
            rows = sum(self.receive_splits)
            expert_R = torch.arange(local, device=counts_E.device).repeat(ranks)
            expert_R = expert_R.repeat_interleave(received_PL.flatten(), output_size=rows)
            self.order_R = expert_R.argsort(stable=True)  # arrival order -> (local expert, source rank) order
            self.arrival_R = torch.empty_like(self.order_R).scatter_(
                0, self.order_R, torch.arange(rows, device=counts_E.device)
            )

    def ops(self, ops: ReferenceOps) -> ReferenceOps:
        """The operations of the local experts' products: `ops`, or the reference definitions when no row arrives
        (they take empty inputs, which fast kernels need not, and still give every local expert a zero gradient)."""
        return ops if sum(self.receive_splits) else _REFERENCE

    def to_experts(self, x_MI: torch.Tensor) -> torch.Tensor:
        """This rank's sorted rows -> the rows of its local experts, grouped by expert (`self.groups`)."""
        x_RI = _all_to_all(x_MI, self.receive_splits, self.send_splits, self.group)
        return x_RI if self.order_R is None else x_RI.index_select(0, self.order_R)

    def from_experts(self, y_RO: torch.Tensor) -> torch.Tensor:
        """The local experts' outputs -> this rank's sorted rows' outputs (the inverse of `to_experts`)."""
        if self.arrival_R is not None:
            y_RO = y_RO.index_select(0, self.arrival_R)
        return _all_to_all(y_RO, self.send_splits, self.receive_splits, self.group)


_REFERENCE = ReferenceOps()


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """`all_to_all_single` with autograd (its backward is the reverse exchange)."""
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), output_splits, input_splits, group))


class ExpertParallelOps:
    """The operations `ops` with each expert product computed on the ranks that hold the experts: a weight sharded
    by expert (a DTensor over the expert-parallel mesh, what FSDP hands the forward after `shard_experts`) has its
    rows exchanged (`TokenExchange`); a plain weight is multiplied in place. Everything else is `ops`' own.

    Made by `JetMoePreTrainedModel.ops_for` once per forward (it is the model's `ops_wrapper`); it keeps the last
    routing's exchange, which MoA's output projection reuses after its query projection."""

    def __init__(self, ops: ReferenceOps) -> None:
        self.ops = ops
        self._last: tuple[weakref.ref, TokenExchange] | None = None

    def __getattr__(self, name: str):
        return getattr(self.ops, name)

    def expert_mlp(self, x_MD, w_E2FD, w_EDF, activation, routing):
        if not isinstance(w_E2FD, DTensor):
            return self.ops.expert_mlp(x_MD, w_E2FD, w_EDF, activation, routing)
        exchange = self._exchange(routing, w_E2FD)
        y_RD = exchange.ops(self.ops).expert_mlp(exchange.to_experts(x_MD), w_E2FD.to_local(), w_EDF.to_local(),
                                                 activation, exchange.groups)
        return exchange.from_experts(y_RD)

    def expert_linear(self, x_MI, w_EOI, routing):
        if not isinstance(w_EOI, DTensor):
            return self.ops.expert_linear(x_MI, w_EOI, routing)
        exchange = self._exchange(routing, w_EOI)
        y_RO = exchange.ops(self.ops).expert_linear(exchange.to_experts(x_MI), w_EOI.to_local(), exchange.groups)
        return exchange.from_experts(y_RO)

    def _exchange(self, routing: Routing, w_EOI: DTensor) -> TokenExchange:
        if self._last is not None and self._last[0]() is routing:
            return self._last[1]
        exchange = TokenExchange(routing.counts_E, w_EOI.device_mesh.get_group())
        self._last = (weakref.ref(routing), exchange)
        return exchange
