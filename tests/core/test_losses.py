"""The chunked linear + cross-entropy against PyTorch's own, and the head bypass."""

from __future__ import annotations

import pytest

from polyadapt.losses import bypass_head, chunk_rows, linear_cross_entropy

torch = pytest.importorskip("torch")
F = torch.nn.functional
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class Allocations(TorchDispatchMode):
    """Every tensor the operators allocate (outputs that share no storage with an input), as ``(shape, dtype)``."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in given:
                self.made.append((tuple(t.shape), t.dtype))
        return out

    def numel(self, shape):
        return torch.Size(shape).numel()


def saved_for_backward(function):
    """The tensors autograd keeps for the backward pass of what ``function()`` computes, and its result."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return saved, result


def inputs(rows=37, width=16, vocab=50, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator) / 4).requires_grad_()
    b = torch.randn(vocab, generator=generator).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, **kwargs):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    return F.cross_entropy(logits, targets, **kwargs)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_every_gradient_match_cross_entropy(rows_per_chunk, reduction):
    hidden, weight, bias, targets = inputs()
    expected = reference(hidden, weight, bias, targets, reduction=reduction)
    got = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction, rows_per_chunk=rows_per_chunk)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(got, [hidden, weight, bias]), grads(expected, [hidden, weight, bias]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_ignored_targets_are_left_out_and_frozen_weights_get_no_gradient():
    hidden, weight, _, targets = inputs(bias=False)
    weight.requires_grad_(False)
    targets[::3] = -100
    expected = reference(hidden, weight, None, targets)
    got = linear_cross_entropy(hidden.reshape(1, 37, 16), weight, targets.reshape(1, 37), rows_per_chunk=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(got, [hidden])
    (e,) = torch.autograd.grad(expected, [hidden])
    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert g[::3].abs().max() == 0


def test_no_target_gives_nan_mean_and_zero_sum_like_cross_entropy():
    hidden, weight, _, targets = inputs(bias=False)
    targets[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets))
    assert linear_cross_entropy(hidden, weight, targets, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")


def test_without_grad_it_only_computes_the_loss():
    hidden, weight, bias, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, bias)
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(hidden, weight, bias, targets).detach(), rtol=1e-5, atol=1e-5)


def test_under_autocast_it_computes_in_the_autocast_dtype_and_the_softmax_in_fp32():
    hidden, weight, bias, targets = inputs(rows=64, width=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.t() + bias).float(), targets)
        got = linear_cross_entropy(hidden, weight, targets, bias, rows_per_chunk=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    g_hidden, g_weight, _ = grads(got, [hidden, weight, bias])
    e_hidden, e_weight, _ = grads(expected, [hidden, weight, bias])
    assert g_hidden.dtype == hidden.dtype and g_weight.dtype == weight.dtype
    torch.testing.assert_close(g_hidden, e_hidden, rtol=5e-2, atol=5e-3)


def test_chunk_rows_follow_the_vocabulary_and_device():
    assert chunk_rows(49152, "cpu", 10_000) == (1 << 23) // 49152
    assert chunk_rows(49152, "cuda", 10_000) == (1 << 27) // 49152
    assert chunk_rows(49152, "cpu", 7) == 7
    assert chunk_rows(1 << 30, "cpu", 7) == 1


def test_bypass_head_returns_the_head_input_and_restores_the_head_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 9))
    x = torch.randn(2, 4)
    with bypass_head(model[1]):
        torch.testing.assert_close(model(x), model[0](x))
    assert model(x).shape == (2, 9)
    with pytest.raises(RuntimeError, match="boom"), bypass_head(model[1]):
        raise RuntimeError("boom")
    assert model(x).shape == (2, 9)


def test_a_frozen_head_gets_no_weight_sized_buffer_and_only_the_hidden_gradient_is_kept():
    hidden, weight, _, targets = inputs(rows=64, width=32, vocab=1000, bias=False)
    weight.requires_grad_(False)  # a frozen (tied) output head, as in LoRA training
    allocations = Allocations()
    with allocations:
        saved, loss = saved_for_backward(
            lambda: linear_cross_entropy(hidden, weight, targets, reduction="sum", rows_per_chunk=8)
        )
        (grad,) = torch.autograd.grad(loss, [hidden])
    assert weight.shape not in [shape for shape, _ in allocations.made]
    # nothing as large as the head is ever allocated: one chunk of logits (8 x 1000) is the largest tensor
    assert max(allocations.numel(shape) for shape, _ in allocations.made) == 8 * 1000
    # autograd keeps the hidden states' gradient and nothing else of any size (no logits, no weight, no hidden)
    assert sum(t.numel() for t in saved) == hidden.numel()
    expected = torch.autograd.grad(reference(hidden, weight, None, targets, reduction="sum"), [hidden])[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_one_logits_buffer_serves_every_chunk():
    hidden, weight, bias, targets = inputs(rows=64, width=32, vocab=1000)
    allocations = Allocations()
    with allocations:
        loss = linear_cross_entropy(hidden, weight, targets, bias, rows_per_chunk=8)
    chunk_sized = [shape for shape, _ in allocations.made if allocations.numel(shape) >= 8 * 1000]
    # one (8 x 1000) buffer for the 8 chunks, and the weight's gradient, accumulated in place
    assert sorted(chunk_sized) == sorted([(8, 1000), tuple(weight.shape)])
    expected = reference(hidden, weight, bias, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_without_grad_only_the_logits_buffer_is_allocated():
    hidden, weight, bias, targets = inputs(rows=64, width=32, vocab=1000)
    allocations = Allocations()
    with torch.no_grad(), allocations:
        linear_cross_entropy(hidden, weight, targets, bias, rows_per_chunk=8)
    assert [shape for shape, _ in allocations.made if allocations.numel(shape) >= 64 * 32] == [(8, 1000)]
