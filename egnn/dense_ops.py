"""Fast building blocks of the dense EGNN: GEMMs, pair pre-activations, gated sums.

Each function computes exactly a textbook expression (stated in its docstring); what they
add is less work: fewer passes over the big (B, N, N, H) edge tensors and a backward that
does not materialise broadcast copies.

On float32 CPU tensors the forward GEMMs go through oneDNN's fused linear (the kernel
torch.compile uses on x86; it fuses SiLU), at float32 accuracy; elsewhere
(CUDA, float64) they fall back to ``torch.nn.functional.linear``. The backward GEMMs use
``torch.mm``: oneDNN reorders transposed operands on every call.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from egnn.layout import PairLayout


def _probe_onednn_linear():
    """oneDNN's ``_linear_pointwise`` if this torch build has it and it passes a self-check."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
        checks = [
            (op(x, w, b, "none", [], ""), F.linear(x, w, b)),
            (op(x, w, b, "swish", [], ""), F.silu(F.linear(x, w, b))),
        ]
        if all(torch.allclose(got, want, atol=1e-5) for got, want in checks):
            return op
    except Exception:  # op missing or unusable on this platform: use the default path
        pass
    return None


_ONEDNN = _probe_onednn_linear()


# oneDNN has ~15 us fixed cost per call (the BLAS path ~3 us): use it from ~1M multiply-adds.
_ONEDNN_MIN_MACS = 1 << 20


def _use_onednn(x: torch.Tensor, macs: int | None = None) -> bool:
    """oneDNN for float32 CPU tensors, and for GEMMs only if they are large enough.

    Never while torch.compile traces (its op has no fake-tensor kernel; the compiler fuses itself).
    """
    return (
        _ONEDNN is not None and x.device.type == "cpu" and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and (macs is None or macs >= _ONEDNN_MIN_MACS)
    )


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _gemm(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """x2 @ weight.T (+ bias) (then SiLU) for 2-d tensors, no autograd."""
    if _use_onednn(x2, x2.shape[0] * weight.numel()):
        return _ONEDNN(x2, weight, bias, "swish" if silu else "none", [], "")
    y = F.linear(x2, weight, bias)
    return F.silu(y) if silu else y


class _Linear(torch.autograd.Function):
    """y = x W^T + b over the last axis, forward and backward by ``_gemm``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.input_shape = x.shape
        return _gemm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        # Plain BLAS here: oneDNN's linear takes the transposed operands of the weight gradient
        # as a "weight" it reorders on every call, ~2x slower than torch.mm (measured at nf 64
        # and 256); for the input gradient both run alike, mm has less fixed cost.
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then SiLU if ``silu``), on any number of leading axes."""
    if not _use_onednn(x, (x.numel() // max(x.shape[-1], 1)) * weight.numel()):
        y = F.linear(x, weight, bias)
        return F.silu(y) if silu else y
    weight = weight.contiguous()
    if _needs_grad(x, weight, bias):
        y = _Linear.apply(x, weight, bias)
        return F.silu(y) if silu else y
    return _gemm(x.reshape(-1, x.shape[-1]), weight, bias, silu).view(*x.shape[:-1], weight.shape[0])


def _pair_differences(x: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    diff = x.new_empty(layout.n_pairs, x.shape[-1])
    for xb, out in zip(layout.node_blocks(x), layout.pair_blocks(diff)):
        torch.sub(xb.unsqueeze(2), xb.unsqueeze(1), out=out)
    return diff


class _PairDifferences(torch.autograd.Function):
    """One autograd node for all blocks (autograd over the loop records ~5 nodes per block)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _pair_differences(x, layout)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        grad = grad.contiguous()
        grad_x = grad.new_empty(layout.n_nodes, grad.shape[-1])
        # d diff_ij / d x_i = +1 (sum over senders j), d diff_ij / d x_j = -1 (sum over receivers i)
        for g, gx in zip(layout.pair_blocks(grad), layout.node_blocks(grad_x)):
            torch.sub(g.sum(2), g.sum(1), out=gx)
        return grad_x, None


def pair_differences(x: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """diff[(b,i,j)] = x[b,i] - x[b,j] for every pair, flat (n_pairs, C) from flat atoms (n_nodes, C)."""
    if _needs_grad(x):
        return _PairDifferences.apply(x, layout)
    return _pair_differences(x, layout)


def _pair_preactivation(receiver, sender, edge_attr, w_edge, layout):
    hidden = receiver.shape[-1]
    per_atom = receiver.new_empty(layout.n_pairs, hidden)
    for r, s, out in zip(layout.node_blocks(receiver), layout.node_blocks(sender), layout.pair_blocks(per_atom)):
        torch.add(r.unsqueeze(2), s.unsqueeze(1), out=out)
    if edge_attr.shape[-1] == 0:  # no edge features (EDM's GNN)
        return per_atom
    # In place: 2-3x faster than oneDNN's fused linear + add into a fresh buffer (measured at
    # nf 64-256 on the CPU; the sum is the same), which pays for writing a new (n_pairs, H) tensor.
    return per_atom.addmm_(edge_attr, w_edge.t())


class _PairPreactivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, receiver, sender, edge_attr, w_edge, layout):
        ctx.save_for_backward(edge_attr, w_edge)
        ctx.layout = layout
        return _pair_preactivation(receiver, sender, edge_attr, w_edge, layout)

    @staticmethod
    def backward(ctx, grad):
        edge_attr, w_edge = ctx.saved_tensors
        layout = ctx.layout
        hidden, k = grad.shape[-1], edge_attr.shape[-1]
        grad = grad.contiguous()
        grad_receiver = grad.new_empty(layout.n_nodes, hidden)
        grad_sender = grad.new_empty(layout.n_nodes, hidden)
        grad_w = grad.new_zeros(k, hidden)
        # One pass per block gives both the receiver gradient (sum over senders j) and partial
        # sums of the edge-weight gradient: [1, e_ij]^T @ grad_ij over j.
        coeff = torch.cat([edge_attr.new_ones(edge_attr.shape[0], 1), edge_attr], dim=1)
        for g, c, gr, gs in zip(layout.pair_blocks(grad), layout.pair_blocks(coeff),
                                layout.node_blocks(grad_receiver), layout.node_blocks(grad_sender)):
            b, m = g.shape[0], g.shape[1]
            reduced = torch.bmm(c.reshape(b * m, m, 1 + k).transpose(1, 2), g.reshape(b * m, m, hidden))
            gr.copy_(reduced[:, 0].view(b, m, hidden))
            grad_w += reduced[:, 1:].sum(0)
            torch.sum(g, dim=1, out=gs)
        grad_edge = None
        if ctx.needs_input_grad[2]:
            grad_edge = _gemm(grad, w_edge.t().contiguous()) if k else grad.new_zeros(grad.shape[0], 0)
        return grad_receiver, grad_sender, grad_edge, grad_w.t(), None


def pair_preactivation(
    receiver: torch.Tensor, sender: torch.Tensor, edge_attr: torch.Tensor, w_edge: torch.Tensor, layout: PairLayout
) -> torch.Tensor:
    """pre[(b,i,j)] = receiver[b,i] + sender[b,j] + edge_attr[(b,i,j)] @ w_edge.T  -> (n_pairs, H).

    receiver, sender (n_nodes, H) flat atoms; edge_attr (n_pairs, K) with small K; w_edge (H, K).
    One fresh buffer; the backward reduces over senders / receivers instead of broadcasting.
    """
    if _needs_grad(receiver, sender, edge_attr, w_edge):
        return _PairPreactivation.apply(receiver, sender, edge_attr, w_edge, layout)
    return _pair_preactivation(receiver, sender, edge_attr, w_edge, layout)


def _stacked_projection_weights(weight: torch.Tensor, bias: torch.Tensor | None, nf: int):
    """The receiver and sender column blocks of ``weight`` stacked (2H, nf); bias on the receiver half."""
    stacked = torch.cat([weight[:, :nf], weight[:, nf : 2 * nf]], dim=0)
    stacked_bias = torch.cat([bias, torch.zeros_like(bias)]) if bias is not None else None
    return stacked, stacked_bias


class _FactorisedPreactivation(torch.autograd.Function):
    """``pair_preactivation`` of the per-atom projections of h, with one backward for all of it.

    Autograd over the composite (weight slices, concatenation, projection GEMM, slices of the
    projections) would build zero-filled copies of the weight and of the projections for every
    slice's gradient; here the receiver and sender gradients are written into one (n_nodes, 2H)
    buffer and the weight gradient is assembled once.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, edge_attr, layout):
        nf, hidden = h.shape[-1], weight.shape[0]
        stacked, stacked_bias = _stacked_projection_weights(weight, bias, nf)
        projections = _gemm(h, stacked, stacked_bias)
        w_edge = weight[:, 2 * nf :]
        ctx.save_for_backward(h, stacked, edge_attr, w_edge)
        ctx.layout, ctx.has_bias = layout, bias is not None
        return _pair_preactivation(projections[:, :hidden], projections[:, hidden:], edge_attr, w_edge, layout)

    @staticmethod
    def backward(ctx, grad):
        h, stacked, edge_attr, w_edge = ctx.saved_tensors
        layout = ctx.layout
        hidden, k = grad.shape[-1], edge_attr.shape[-1]
        grad = grad.contiguous()
        grad_proj = grad.new_empty(layout.n_nodes, 2 * hidden)  # [receiver | sender] gradients
        grad_w_edge = grad.new_zeros(k, hidden)
        coeff = torch.cat([edge_attr.new_ones(edge_attr.shape[0], 1), edge_attr], dim=1)
        receivers = layout.node_blocks(grad_proj[:, :hidden])
        senders = layout.node_blocks(grad_proj[:, hidden:])
        for g, c, gr, gs in zip(layout.pair_blocks(grad), layout.pair_blocks(coeff), receivers, senders):
            b, m = g.shape[0], g.shape[1]
            reduced = torch.bmm(c.reshape(b * m, m, 1 + k).transpose(1, 2), g.reshape(b * m, m, hidden))
            gr.copy_(reduced[:, 0].view(b, m, hidden))
            grad_w_edge += reduced[:, 1:].sum(0)
            gs.copy_(g.sum(1))
        grad_h = torch.mm(grad_proj, stacked) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = grad_edge = None
        if ctx.needs_input_grad[1]:
            grad_stacked = torch.mm(grad_proj.t(), h)  # (2H, nf)
            grad_weight = torch.cat([grad_stacked[:hidden], grad_stacked[hidden:], grad_w_edge.t()], dim=1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_proj[:, :hidden].sum(0)
        if ctx.needs_input_grad[3]:
            grad_edge = _gemm(grad, w_edge.t().contiguous()) if k else grad.new_zeros(grad.shape[0], 0)
        return grad_h, grad_weight, grad_bias, grad_edge, None


def factorised_pair_preactivation(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, edge_attr: torch.Tensor, layout: PairLayout
) -> torch.Tensor:
    """``F.linear(cat([h_i, h_j, edge_attr_ij]), weight, bias)`` for every pair -> (n_pairs, H).

    h (n_nodes, nf), weight (H, 2*nf + K), edge_attr (n_pairs, K): per-atom projections (one
    GEMM) summed pairwise plus the small edge term (``pair_preactivation``).
    """
    if _needs_grad(h, weight, bias, edge_attr):
        return _FactorisedPreactivation.apply(h, weight, bias, edge_attr, layout)
    nf, hidden = h.shape[-1], weight.shape[0]
    stacked, stacked_bias = _stacked_projection_weights(weight, bias, nf)
    projections = _gemm(h, stacked, stacked_bias)
    return _pair_preactivation(projections[:, :hidden], projections[:, hidden:], edge_attr, weight[:, 2 * nf :], layout)


def _sum_over_senders(weights: torch.Tensor, values: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """out[b,i] = sum_j weights[(b,i,j)] * values[(b,i,j)], flat (n_nodes, C); no autograd."""
    channels = values.shape[-1]
    out = values.new_empty(layout.n_nodes, channels)
    for w, v, o in zip(layout.pair_blocks(weights), layout.pair_blocks(values), layout.node_blocks(out)):
        b, m = w.shape[0], w.shape[1]
        torch.bmm(w.reshape(b * m, m, 1).transpose(1, 2), v.reshape(b * m, m, channels), out=o.view(b * m, 1, channels))
    return out


def _gated_sum(m, weight, bias, edge_mask, layout):
    att = torch.sigmoid(torch.addmm(bias, m, weight.t()))  # (n_pairs, 1)
    return _sum_over_senders(att * edge_mask, m, layout), att


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, weight, bias, edge_mask, layout):
        agg, att = _gated_sum(m, weight, bias, edge_mask, layout)
        ctx.save_for_backward(m, weight, att, edge_mask)
        ctx.layout = layout
        return agg

    @staticmethod
    def backward(ctx, grad_agg):
        m, weight, att, edge_mask = ctx.saved_tensors
        layout = ctx.layout
        hidden = m.shape[-1]
        grad_agg = grad_agg.contiguous()
        gate = att * edge_mask
        grad_gate = m.new_empty(layout.n_pairs, 1)
        for mb, ga, gg in zip(layout.pair_blocks(m), layout.node_blocks(grad_agg), layout.pair_blocks(grad_gate)):
            b, n = mb.shape[0], mb.shape[1]
            torch.bmm(mb.reshape(b * n, n, hidden), ga.reshape(b * n, hidden, 1), out=gg.view(b * n, n, 1))
        grad_logit = grad_gate * edge_mask * att * (1 - att)
        # Both message gradients in one batched GEMM with K = 2:
        # grad_m[(b,i,j)] = gate[(b,i,j)] * grad_agg[b,i] + grad_logit[(b,i,j)] * weight.
        coeff = torch.cat([gate, grad_logit], dim=1)  # (n_pairs, 2)
        grad_m = m.new_empty(layout.n_pairs, hidden)
        for c, ga, gm in zip(layout.pair_blocks(coeff), layout.node_blocks(grad_agg), layout.pair_blocks(grad_m)):
            b, n = c.shape[0], c.shape[1]
            rows = torch.stack([ga.reshape(b * n, hidden), weight.expand(b * n, hidden)], dim=1)  # (b*n, 2, H)
            torch.bmm(c.reshape(b * n, n, 2), rows, out=gm.view(b * n, n, hidden))
        grad_w = grad_logit.t() @ m if ctx.needs_input_grad[1] else None
        grad_b = grad_logit.sum(0) if ctx.needs_input_grad[2] else None
        return grad_m, grad_w, grad_b, None, None


def gated_sum(m: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, edge_mask: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """agg[b,i] = sum_j sigmoid(m[(b,i,j)] . weight + bias) * edge_mask[(b,i,j)] * m[(b,i,j)]  -> (n_nodes, H).

    m (n_pairs, H), weight (1, H), bias (1,), edge_mask (n_pairs, 1). The backward makes three
    passes over m instead of autograd's five.
    """
    if _needs_grad(m, weight, bias):
        return _GatedSum.apply(m, weight, bias, edge_mask, layout)
    return _gated_sum(m, weight, bias, edge_mask, layout)[0]


class _MaskedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weights, layout):
        ctx.save_for_backward(values, weights)
        ctx.layout = layout
        return _sum_over_senders(weights, values, layout)

    @staticmethod
    def backward(ctx, grad):
        values, weights = ctx.saved_tensors
        layout = ctx.layout
        channels = values.shape[-1]
        grad = grad.contiguous()
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:  # weights[(b,i,j)] * grad[b,i]
            grad_values = values.new_empty(layout.n_pairs, channels)
            for w, g, out in zip(layout.pair_blocks(weights), layout.node_blocks(grad), layout.pair_blocks(grad_values)):
                torch.mul(w, g.unsqueeze(2), out=out)
        if ctx.needs_input_grad[1]:  # values[(b,i,j)] . grad[b,i]
            grad_weights = weights.new_empty(layout.n_pairs, 1)
            for v, g, out in zip(layout.pair_blocks(values), layout.node_blocks(grad), layout.pair_blocks(grad_weights)):
                b, m = v.shape[0], v.shape[1]
                torch.bmm(v.reshape(b * m, m, channels), g.reshape(b * m, channels, 1), out=out.view(b * m, m, 1))
        return grad_values, grad_weights, None


def masked_sum(values: torch.Tensor, weights: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """sum_j weights[(b,i,j)] * values[(b,i,j)] -> (n_nodes, C); values (n_pairs, C), weights (n_pairs, 1)."""
    if _needs_grad(values, weights):
        return _MaskedSum.apply(values, weights, layout)
    return _sum_over_senders(weights, values, layout)
