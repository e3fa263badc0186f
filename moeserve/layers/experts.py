"""Stacked routed experts: one weight per expert, computed for the routes sorted by expert.

Legend: T tokens, E experts (E_local on this rank), K top-k, H hidden, I expert intermediate,
R = T*K routes.

Dispatch sorts the R routes by expert so each expert works on one contiguous slice. On GPU every
expert runs in one grouped matmul (F.grouped_mm: the slice bounds stay on the device, no sync).
On CPU the group sizes are already in host memory, and a loop of oneDNN linears, one per expert
with routes, measured 1.4-2.2x faster than grouped_mm / F.linear for the 1-256 rows an expert
gets in serving steps (scripts/bench_moe_layer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels import native, ops
from moeserve.layers.linear import NativeBF16Weight, NativeInt8Weight, PackedWeight, WeightFormat, linear, pack_weight
from moeserve.layers.routing import Routing
from moeserve.models.config import ExpertActivation


@dataclass(frozen=True)
class ExpertOptions:
    """What an expert computes besides the plain SwiGLU (gpt-oss): biases after each projection
    (b13 [E_local, 2I] gate then up, b2 [E_local, H]) and the clamped SwiGLU
    (up + 1) * gate * sigmoid(alpha * gate), gate clamped above at limit and up to +-limit."""
    activation: ExpertActivation = "swiglu"
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0


_INT8_FLOAT32_MAX_ROUTES = 256   # int8 experts run in float32 up to this many routes in a step


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Experts(nn.Module):
    """E stacked SwiGLU experts: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I].

    Stacking makes expert parallelism a slice of dim 0: a rank holds experts
    [first_expert, first_expert + E_local).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int,
                 first_expert: int = 0, num_local: int | None = None,
                 options: ExpertOptions = ExpertOptions(), weight_input: bool = False) -> None:
        super().__init__()
        # Llama 4: each route's weight scales the expert's input (expert(w * x)), not its output
        # (w * expert(x)); SwiGLU is not linear, so the two differ.
        self.weight_input = weight_input
        num_local = num_experts if num_local is None else num_local
        self.holds_all = first_expert == 0 and num_local == num_experts
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, intermediate))
        self.options = options
        self.plain_swiglu = options == ExpertOptions()    # the fast paths below as they always were
        self.b13 = nn.Parameter(torch.empty(num_local, 2 * intermediate)) if options.bias else None
        self.b2 = nn.Parameter(torch.empty(num_local, hidden)) if options.bias else None
        self.first_expert = first_expert
        self.num_local = num_local
        self.intermediate = intermediate
        # After pack(): one packed weight per local expert, and w13 / w2 are None.
        self.packed: dict[str, list[PackedWeight]] = {}
        self.float32_io = False   # packed for an int8 kernel with float32 in and out: small batches then run in float32 (see _per_expert)
        self._fused: tuple | None = None     # see _fused_layer

    def pack(self, name: str, stacked: torch.Tensor, fmt: WeightFormat) -> None:
        """Keeps w13 or w2 ([E_local, out, in]) only as one packed weight per expert."""
        self.packed[name] = [pack_weight(w, fmt) for w in stacked]
        self._fused = None
        self.float32_io = fmt.computes_in_float32
        setattr(self, name, None)

    def _matmul(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        # x [n, in] -> [n, out] through expert e's w13 or w2
        packed = self.packed.get(name)
        return linear(x, getattr(self, name)[e]) if packed is None else packed[e](x)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # x [T, H] -> [T, H]: sum over each token's routes of weight * expert(x)
        t, k = routing.expert_ids.shape
        if not self.weight_input and native.supports(x):
            return self._forward_native(x, routing)
        if t == 1 and x.device.type == "cpu" and self.holds_all and not routing.capacity_limited:
            return self._one_token(x, routing)
        local_ids = self._local_ids(routing)                                      # [R], sentinel E_local
        order = local_ids.argsort(stable=True)                                    # [R] grouped by expert
        token_of_route = order.div(k, rounding_mode="floor")                      # [R]
        x_sorted = x.index_select(0, token_of_route)                              # [R, H]
        route_w = routing.weights.flatten()[order, None]                          # [R, 1] float32
        if self.weight_input:
            x_sorted = x_sorted * route_w.to(x.dtype)
        group_sizes = torch.bincount(local_ids, minlength=self.num_local + 1)     # [E_local + 1]
        if x.device.type == "cpu":
            out_sorted = self._per_expert(x_sorted, group_sizes.tolist())         # host memory: no sync
        else:
            out_sorted = self._grouped(x_sorted, group_sizes)
            if not self.holds_all or routing.capacity_limited:
                # grouped_mm leaves the rows past the last local group uninitialised (other
                # ranks' or dropped routes); the CPU path zeroes them itself.
                out_sorted = torch.where((local_ids[order] < self.num_local)[:, None], out_sorted, 0.0)
        # Weighted sum in float32, routes back in token order: [R, H] -> [T, K, H] -> [T, H].
        weighted = out_sorted.float() if self.weight_input else out_sorted.float().mul_(route_w)
        by_token = torch.empty_like(weighted).index_copy_(0, order, weighted)
        return by_token.view(t, k, -1).sum(1).to(x.dtype)

    def _forward_native(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """forward() on the CPU with the native kernels: sort, gather, SwiGLU and the weighted
        combine are one call each (the same results; PyTorch spends ~12 small ops on them).
        Only the routed rows are gathered and computed. With native int8 (or bf16) weights and
        a plain SwiGLU the whole layer is one call (ops.moe_int8 / moe_bf16: the same results
        again, see _fused_layer)."""
        t, k = routing.expert_ids.shape
        kept = routing.kept if routing.capacity_limited else None
        fused = self._fused_layer()
        if fused is not None and (fused[0] is ops.moe_int8 or x.dtype == torch.bfloat16):
            kernel, w13, w2 = fused
            return kernel(x, routing.expert_ids, kept, routing.weights, self.first_expert, self.num_local,
                          self.intermediate, w13, w2)
        order, sizes = ops.sort_routes(routing.expert_ids, kept, self.first_expert, self.num_local)   # [R]
        routed = t * k - sizes[-1]
        compute = torch.float32 if self.float32_io and routed <= _INT8_FLOAT32_MAX_ROUTES else x.dtype
        x_sorted = ops.gather_rows(x, order, k, routed, compute)                  # [routed, H]
        out_sorted = self._per_expert(x_sorted, sizes)                            # [routed, H]
        return ops.moe_combine(out_sorted, order, routing.weights, t, k, x.dtype)  # [T, H]

    def _fused_layer(self) -> tuple | None:
        """(ops.moe_int8 or ops.moe_bf16, w13's and w2's tables of addresses), built once; None
        unless every expert is packed for one of those kernels with a plain SwiGLU between."""
        if self._fused is None:
            self._fused = ()
            experts = [self.packed.get("w13"), self.packed.get("w2")]
            if self.plain_swiglu and all(experts):
                weights = experts[0] + experts[1]
                if all(isinstance(w, NativeInt8Weight) for w in weights):
                    self._fused = (ops.moe_int8, *(torch.tensor(
                        [[w.packed.data_ptr() for w in p], [w.wsum.data_ptr() for w in p],
                         [w.scale.data_ptr() for w in p]], dtype=torch.int64) for p in experts))
                elif all(isinstance(w, NativeBF16Weight) for w in weights) \
                        and self.intermediate % 2 == 0 and experts[1][0].out_features % 2 == 0:   # rows of even length
                    self._fused = (ops.moe_bf16, *(torch.tensor([w.packed.data_ptr() for w in p], dtype=torch.int64)
                                                   for p in experts))
        return self._fused or None

    def _one_token(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A single token (a one-stream decode): its K experts in turn, with none of the sorting
        and scattering a batch needs (half the small ops of a decode step's MoE layers). The
        same products, summed in float32 in the same route order as forward()."""
        scales = routing.weights[0].to(x.dtype) if self.weight_input else None   # [K], as forward() rounds them
        compute = torch.float32 if self.float32_io else x.dtype     # as _per_expert at decode sizes
        x_in = x.to(compute)
        total = None
        for i, (e, weight) in enumerate(zip(routing.expert_ids[0].tolist(), routing.weights[0].tolist())):
            gate_up = self._matmul("w13", e, x_in if scales is None else (x * scales[i]).to(compute))   # [1, 2I]
            if self.b13 is not None:
                gate_up = gate_up + self.b13[e]
            y = self._matmul("w2", e, self._activation(gate_up))                  # [1, H]
            if self.b2 is not None:
                y = y + self.b2[e]
            y = y.float() if scales is not None else y.float().mul_(weight)
            total = y if total is None else total.add_(y)
        return total.to(x.dtype)

    def _activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] gate columns then up columns -> [n, I]."""
        gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate:]
        if self.options.activation == "swiglu":
            return F.silu(gate).mul_(up)
        limit = self.options.limit
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        # the reference's order of operations, so float32 results match it bit for bit
        return (up + 1) * (gate * torch.sigmoid(gate * self.options.alpha))

    def _add_bias(self, out: torch.Tensor, bias: torch.Tensor | None, sizes: torch.Tensor) -> torch.Tensor:
        """out [n, N] rows sorted by expert, sizes [>= E_local] rows per expert (rows past the
        local experts' get the last local bias: they are discarded) -> out + each row's bias."""
        if bias is None:
            return out
        ids = torch.arange(sizes.shape[0], device=out.device)
        row_expert = torch.repeat_interleave(ids, sizes, output_size=out.shape[0])   # [n], no host sync
        return out + bias.index_select(0, row_expert.clamp_(max=self.num_local - 1))

    def _local_ids(self, routing: Routing) -> torch.Tensor:
        """[R] this rank's expert index of each route; E_local for routes owned by other ranks or
        dropped by a capacity limit (they sort last and are not computed here)."""
        ids = routing.expert_ids.flatten()
        if self.holds_all and not routing.capacity_limited:
            return ids
        local_ids = ids - self.first_expert
        is_local = (local_ids >= 0) & (local_ids < self.num_local)
        if routing.capacity_limited:
            is_local &= routing.kept.flatten()
        return torch.where(is_local, local_ids, self.num_local)

    def run_rows(self, rows: torch.Tensor, local_ids: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
        """Unweighted expert outputs for rows another rank sent: rows [n, H], local_ids [n] in
        [0, E_local), per_expert [E_local] rows per expert (host ints) -> [n, H]."""
        if rows.shape[0] == 0:
            return rows
        order = local_ids.argsort(stable=True)                                    # [n] grouped by expert
        x_sorted = rows[order]
        if rows.device.type == "cpu":
            out_sorted = self._per_expert(x_sorted, per_expert).to(rows.dtype)
        else:
            sizes = torch.tensor(per_expert + [0], device=rows.device)
            out_sorted = self._grouped(x_sorted, sizes)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out

    def _grouped(self, x_sorted: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped matmuls; slice bounds stay on the device (GPU path)."""
        offsets = group_sizes[: self.num_local].cumsum(0).to(torch.int32)         # [E_local]
        gate_up = F.grouped_mm(x_sorted, self.w13.transpose(-2, -1), offs=offsets)  # [R, 2I]
        if not self.plain_swiglu:
            gate_up = self._add_bias(gate_up, self.b13, group_sizes)
            out = F.grouped_mm(self._activation(gate_up), self.w2.transpose(-2, -1), offs=offsets)
            return self._add_bias(out, self.b2, group_sizes)                     # [R, H]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offsets)  # [R, H]

    def _per_expert(self, x_sorted: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """CPU: one oneDNN / int8 linear per expert with routes (its small-row kernel beats
        grouped_mm 1.4-2x), the SwiGLU once over all of them. [R, H] -> [R, H] in x's dtype, or
        float32 for int8 weights at decode sizes: the int8 kernel takes and gives float32, and
        converting each expert's input and output to and from bf16 cost ~20 us a call (a fifth
        of a 4-row 1024x2048 call); at prefill sizes bf16 (float32 SwiGLU is 2-3x slower there).
        Rows past the local experts' (other ranks', dropped) are zero."""
        sizes = sizes[: self.num_local]
        routed = sum(sizes)
        if self.float32_io and routed <= _INT8_FLOAT32_MAX_ROUTES:
            x_sorted = x_sorted.float()
        slices = list(self._slices(sizes))
        if not slices:
            return x_sorted.new_zeros(x_sorted.shape)
        gate_up = self._each_expert("w13", x_sorted, slices)                                   # [routed, 2I]
        if self.plain_swiglu and native.supports(gate_up):
            hidden = ops.swiglu(gate_up)                                                       # [routed, I]
        elif self.plain_swiglu:
            hidden = F.silu(gate_up[:, : self.intermediate]).mul_(gate_up[:, self.intermediate:])  # [routed, I]
        else:
            local_sizes = torch.tensor(sizes)
            hidden = self._activation(self._add_bias(gate_up, self.b13, local_sizes))
        out = self._each_expert("w2", hidden, slices)                                          # [routed, H]
        if self.b2 is not None:
            out = self._add_bias(out, self.b2, local_sizes)
        if routed < x_sorted.shape[0]:
            out = torch.cat((out, out.new_zeros(x_sorted.shape[0] - routed, out.shape[1])))   # [R, H]
        return out

    def _each_expert(self, name: str, rows: torch.Tensor, slices: list[tuple[int, int, int]]) -> torch.Tensor:
        """Each expert's w13 or w2 over its slice of rows [routed, in] -> [routed, out]. Kernels that
        write into a given tensor (the native ones) fill one output in place; the others' outputs
        are joined by one cat rather than a slice assignment each (16 experts a layer at batch 16
        made that 32 small copies a layer)."""
        packed = self.packed.get(name)
        first = packed[slices[0][0]] if packed else None
        if first is not None and first.writes_into and rows.dtype in native.DTYPES:
            out = torch.empty(slices[-1][2], first.out_features, dtype=rows.dtype)
            for e, start, end in slices:
                packed[e](rows[start:end], out=out[start:end])
            return out
        return _cat([self._matmul(name, e, rows[start:end]) for e, start, end in slices])

    @staticmethod
    def _slices(sizes: list[int]):
        """(expert, first row, end row) of each expert with routes, rows sorted by expert."""
        start = 0
        for e, n in enumerate(sizes):
            if n:
                yield e, start, start + n
                start += n
