"""The LM head and cross-entropy in chunks of tokens, so the full [tokens, vocabulary] logits never exist.

Shape legend: N tokens, D hidden, V vocabulary, C tokens in a chunk.

At a 128k vocabulary and 16k tokens per micro-batch the logits are 4.2 GB in bf16 and their fp32 copy for the
loss 8.4 GB, before their gradient. Here the forward computes each chunk's logits, keeps only its log-sum-exp
and the target logit, and frees them; the backward recomputes each chunk's logits once more (one extra head
matmul, ~2 N D V FLOPs) and turns them into the chunk's gradients for the hidden states and the head weight.
Peak extra memory is one chunk's logits in fp32: C x V x 4 bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean over tokens of cross_entropy(hidden @ weight.T, targets), without materialising the logits."""

    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)  # fp32 for bf16/fp16, as F.cross_entropy on .float()
        total = hidden_ND.new_zeros((), dtype=acc)
        lse_N = torch.empty(hidden_ND.shape[0], dtype=acc, device=hidden_ND.device)
        for start in range(0, hidden_ND.shape[0], chunk):
            logits_CV = (hidden_ND[start:start + chunk] @ weight_VD.T).to(acc)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_C = logits_CV.gather(1, targets_N[start:start + chunk, None]).squeeze(1)
            total += (lse_C - target_C).sum()
            lse_N[start:start + chunk] = lse_C
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, lse_N)
        ctx.chunk = chunk
        device_type = hidden_ND.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return total / hidden_ND.shape[0]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # The backward runs outside the forward's autocast (the autograd engine does not carry it): enter it
        # again, so the recomputed logits are the forward's (bf16 GEMMs on tensor cores under bf16 autocast)
        # and agree with the saved log-sum-exp, and the two gradient GEMMs run in the same precision.
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return ChunkedCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss: torch.Tensor):
        hidden_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        scale = grad_loss / hidden_ND.shape[0]
        grad_hidden = torch.empty_like(hidden_ND) if ctx.needs_input_grad[0] else None
        acc = lse_N.dtype
        grad_weight = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden_ND.shape[0], ctx.chunk):
            h_CD = hidden_ND[start:start + ctx.chunk]
            logits_CV = (h_CD @ weight_VD.T).to(acc)
            # d loss / d logits = softmax - one_hot(target), times the mean's 1 / N
            grad_CV = torch.exp(logits_CV - lse_N[start:start + ctx.chunk, None])
            grad_CV[torch.arange(h_CD.shape[0], device=h_CD.device), targets_N[start:start + ctx.chunk]] -= 1.0
            grad_CV = (grad_CV * scale).to(h_CD.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = grad_CV @ weight_VD
            if grad_weight is not None:
                grad_weight += (grad_CV.T @ h_CD).to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VD.dtype)
        return grad_hidden, grad_weight, None, None


def lm_loss(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int = 0
            ) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T`; `chunk` > 0 tokens at a time (no full logits)."""
    if chunk <= 0 or chunk >= hidden_ND.shape[0]:
        return F.cross_entropy((hidden_ND @ weight_VD.T).to(torch.promote_types(hidden_ND.dtype, torch.float32)),
                               targets_N)
    return ChunkedCrossEntropy.apply(hidden_ND, weight_VD, targets_N, chunk)
