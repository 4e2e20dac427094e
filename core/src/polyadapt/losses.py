"""Losses shared by the modalities: a chunked linear + cross-entropy for large output vocabularies.

A language model's output head turns ``N`` hidden states into ``N x V`` logits (``V`` is 49,152 for SmolLM2 and
51,865 for Whisper). Materialising them, then their log-softmax, then the gradient of that, costs three ``N x V``
tensors of memory traffic and most of a small model's activation memory. :func:`linear_cross_entropy` computes the
loss and the gradient of the hidden states chunk by chunk in the forward pass instead: each chunk's logits live only
long enough to produce its loss and its share of the gradient, so peak memory no longer grows with ``N x V`` and the
softmax runs on cache-sized pieces. The backward pass only scales the stored gradient.

:func:`bypass_head` lets a whole model run up to (not through) its output head, so the head's input can go into
:func:`linear_cross_entropy` while the forward pass still goes through the model's own ``forward`` (and so through
``DistributedDataParallel`` and PEFT wrappers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100

# logits elements per chunk: 8 Mi (32 MiB in fp32) on CPU, where the softmax should run on cache-sized pieces;
# larger on a GPU, where fewer and larger kernels are faster and memory is the constraint
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def chunk_rows(vocab_size: int, device_type: str, rows: int) -> int:
    """Rows of hidden states per chunk for a vocabulary of ``vocab_size`` on ``device_type``."""
    budget = _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS["cuda"])
    return max(1, min(rows, budget // max(1, vocab_size)))


@lru_cache(maxsize=1)
def _linear_cross_entropy_function() -> type:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum of cross-entropies of ``hidden @ weight.T + bias`` against ``targets``, gradients computed in forward.

        Memory: one fp32 ``rows x V`` buffer holds each chunk's logits, turned in place into its softmax and then into
        the gradient of the logits (plus one ``rows x V`` buffer in the compute dtype when that is not fp32); nothing
        of size ``V x H`` is allocated unless ``weight`` itself needs a gradient. Only the gradients are saved for the
        backward pass (the hidden states and the weight are not)."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, rows, need_hidden, need_weight, need_bias):
            count, vocab = hidden.shape[0], weight.shape[0]
            rows = min(rows, count)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            any_grad = need_hidden or need_weight or need_bias
            # the chunk's logits, softmax and logit gradient, in fp32, reused from chunk to chunk
            buffer = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
            # the matmuls' own output (and input) in the compute dtype, when that is not fp32
            low = None if hidden.dtype == torch.float32 else torch.empty((rows, vocab), dtype=hidden.dtype,
                                                                         device=hidden.device)  # fmt: skip
            for start in range(0, count, rows):
                chunk = hidden[start : start + rows]
                target = targets[start : start + rows, None]
                n = chunk.shape[0]
                logits = buffer[:n]
                if low is None:
                    torch.matmul(chunk, weight.t(), out=logits)
                    if bias is not None:
                        logits += bias
                else:
                    product = torch.matmul(chunk, weight.t(), out=low[:n])
                    if bias is not None and bias.dtype == product.dtype:
                        product += bias  # in the compute dtype, as ``chunk @ weight.T + bias`` would be
                    logits.copy_(product)
                    if bias is not None and bias.dtype != product.dtype:
                        logits += bias  # a wider bias promotes the sum
                # -log softmax(z)[t] = log(sum(exp(z - max))) + max - z[t], the exponentials taken in place
                top = logits.amax(dim=1, keepdim=True)
                picked = logits.gather(1, target)
                sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
                total += (sums.log() + top - picked).sum()
                if not any_grad:
                    continue
                # d(loss)/d(logits) = softmax - one_hot(target), built in place over the exponentials
                grad_logits = logits.div_(sums)
                grad_logits.scatter_add_(1, target, torch.full_like(picked, -1.0))
                if grad_hidden is not None:
                    operand = grad_logits if low is None else low[:n].copy_(grad_logits)
                    torch.matmul(operand, weight, out=grad_hidden[start : start + n])
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), chunk.float())
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0)
            ctx.save_for_backward(
                *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
            )
            ctx.present = (need_hidden, need_weight, need_bias)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            saved = ctx.saved_tensors
            grads = []
            for tensor, present, dtype in zip(saved, ctx.present, ctx.dtypes, strict=True):
                grads.append((tensor * grad_output).to(dtype) if present else None)
            return grads[0], grads[1], grads[2], None, None, None, None, None

    return LinearCrossEntropy


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets)`` without materialising the logits.

    ``hidden`` is ``(..., H)``, ``weight`` ``(V, H)``, ``targets`` the matching ``(...)`` class indices;
    ``ignore_index`` targets are left out. ``reduction`` is ``"mean"`` (over the kept targets) or ``"sum"``.
    The softmax is taken in fp32 whatever the input dtype. Gradients flow to every input that requires them.
    """
    import torch

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    count = targets.shape[0]
    if count == 0:
        # no target: a zero that still depends on the inputs, like F.cross_entropy's sum over nothing
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero if reduction == "sum" else zero / 0.0
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
    else:
        hidden_c, weight_c, bias_c = hidden, weight.to(hidden.dtype), bias
    rows = rows_per_chunk or chunk_rows(weight.shape[0], hidden.device.type, count)
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (hidden_c, weight_c, bias_c)]
    with torch.autocast(hidden.device.type, enabled=False):
        total = _linear_cross_entropy_function().apply(hidden_c, weight_c, bias_c, targets, rows, *needs)
    return total / count if reduction == "mean" else total


@contextmanager
def bypass_head(head: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``head`` returns its input unchanged, so the model around it returns the head's input."""
    head.forward = _identity  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
