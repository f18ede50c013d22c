"""Local kernels and the merge: lse is real, backward with the final (out, lse) is exact, empty rows are 0."""
from __future__ import annotations

import pytest
import torch

from megatron_usp.kernels import MathKernel, TorchCPUKernel, kernel_names, resolve_kernel
from megatron_usp.kernels.torch_sdpa import TorchCUDAEfficientKernel, TorchCUDAFlashKernel
from megatron_usp.merge import merge_partial
from reference import reference_attention, relative_error

KERNELS = [MathKernel(), TorchCPUKernel()]


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("causal", [True, False])
def test_lse_and_output_are_exact(kernel, causal):
    q, k, v = rand(2, 10, 4, 6, seed=1), rand(2, 10, 2, 6, seed=2), rand(2, 10, 2, 6, seed=3)
    out, lse = kernel.forward(q, k, v, causal=causal, softmax_scale=0.4)
    assert relative_error(out, reference_attention(q, k, v, causal=causal, softmax_scale=0.4)) < 1e-12
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * 0.4
    if causal:
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-12)
    assert lse.shape == (2, 4, 10)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_blockwise_forward_merge_and_backward_equal_full_attention(kernel):
    """Split keys in two blocks: merged forward and summed block backwards (given the final out/lse) are exact."""
    q, k, v, g = rand(1, 6, 4, 8, seed=4), rand(1, 9, 1, 8, seed=5), rand(1, 9, 1, 8, seed=6), rand(1, 6, 4, 8, seed=7)
    out = torch.zeros(1, 6, 4, 8, dtype=torch.float64)
    lse = torch.full((1, 4, 6), float("-inf"), dtype=torch.float64)
    for part in (slice(0, 4), slice(4, 9)):
        out, lse = merge_partial(out, lse, *kernel.forward(q, k[:, part], v[:, part], causal=False, softmax_scale=0.3))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*full, causal=False, softmax_scale=0.3)
    ref.backward(g)
    assert relative_error(out, ref) < 1e-12
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for part in (slice(0, 4), slice(4, 9)):
        bq, bk, bv = kernel.backward(g, q, k[:, part], v[:, part], out, lse, causal=False, softmax_scale=0.3)
        dq += bq
        dk[:, part] += bk
        dv[:, part] += bv
    for mine, ref_grad in zip((dq, dk, dv), (full[0].grad, full[1].grad, full[2].grad)):
        assert relative_error(mine, ref_grad) < 1e-12


def test_merge_keeps_empty_rows_zero_and_finite():
    out = torch.zeros(1, 2, 1, 3)
    lse = torch.full((1, 1, 2), float("-inf"))
    block_out = torch.tensor([[[[1.0, 2.0, 3.0]], [[float("nan")] * 3]]])
    block_lse = torch.tensor([[[0.5, float("-inf")]]])
    out, lse = merge_partial(out, lse, block_out, block_lse)
    assert torch.equal(out[0, 0, 0], torch.tensor([1.0, 2.0, 3.0])) and torch.equal(out[0, 1, 0], torch.zeros(3))
    assert lse[0, 0, 0] == 0.5 and torch.isneginf(lse[0, 0, 1])


def test_merge_is_the_softmax_of_the_union():
    a, b = rand(1, 3, 2, 4, seed=8), rand(1, 3, 2, 4, seed=9)
    la, lb = rand(1, 2, 3, seed=10), rand(1, 2, 3, seed=11) + 3.0
    out, lse = merge_partial(a.clone(), la.clone(), b, lb)
    wa = torch.exp(la - torch.logaddexp(la, lb)).transpose(1, 2).unsqueeze(-1)
    assert torch.allclose(out, wa * a + (1 - wa) * b, atol=1e-12)
    assert torch.allclose(lse, torch.logaddexp(la, lb), atol=1e-12)


def test_registry_auto_and_errors():
    assert {"auto", "torch", "math", "torch_cpu", "torch_flash", "torch_efficient"} <= set(kernel_names())
    cpu = torch.device("cpu")
    assert isinstance(resolve_kernel("auto", cpu, torch.float32, 64), TorchCPUKernel)
    assert isinstance(resolve_kernel("torch", cpu, torch.bfloat16, 64), TorchCPUKernel)
    assert isinstance(resolve_kernel("math", cpu, torch.float32, 64), MathKernel)
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_kernel("torch_flash", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_kernel("xformers", cpu, torch.float32, 64)


def test_cuda_availability_rules():
    from megatron_usp.kernels import _cuda_efficient, _cuda_flash

    cuda = torch.device("cuda")
    assert _cuda_flash(cuda, torch.bfloat16, 128) is None
    assert "float16/bfloat16" in _cuda_flash(cuda, torch.float32, 128)
    assert "head_dim" in _cuda_flash(cuda, torch.bfloat16, 512)
    assert _cuda_efficient(cuda, torch.float32, 512) is None


class _RecordingOps:
    """Stands in for torch.ops.aten to check what the CUDA adapters pass, on CPU."""

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        def op(*args, **kwargs):
            self.calls[name] = (args, kwargs)
            q = args[1] if name.endswith("backward") else args[0]
            b, h, s, d = q.shape
            if name == "_scaled_dot_product_efficient_attention":
                return torch.zeros(b, h, s, d), torch.zeros(b, h, -(-s // 32) * 32), None, None
            if name == "_scaled_dot_product_flash_attention":
                return (torch.zeros(b, h, s, d), torch.zeros(b, h, s)) + (None,) * 7
            k = args[2]
            grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(k))
            return grads + (None,) if "efficient" in name else grads

        return op


@pytest.mark.parametrize("kernel_cls", [TorchCUDAFlashKernel, TorchCUDAEfficientKernel])
def test_cuda_adapters_argument_mapping(monkeypatch, kernel_cls):
    fake = _RecordingOps()
    monkeypatch.setattr(torch.ops, "aten", fake)
    kernel = kernel_cls()
    q, k = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8)
    out, lse = kernel.forward(q, k, k, causal=True, softmax_scale=0.25)
    assert out.shape == q.shape and lse.shape == (2, 4, 40)
    dq, dk, dv = kernel.backward(q, q, k, k, out, lse, causal=True, softmax_scale=0.25)
    assert dq.shape == q.shape and dk.shape == k.shape
    (fwd_name,) = [n for n in fake.calls if not n.endswith("backward")]
    args, kwargs = fake.calls[fwd_name]
    assert args[0].shape == (2, 4, 40, 8) and args[1].shape == (2, 4, 40, 8)  # bhsd, kv heads expanded
    assert kwargs["scale"] == 0.25 and True in args[3:7]
    (bwd_name,) = [n for n in fake.calls if n.endswith("backward")]
    args, kwargs = fake.calls[bwd_name]
    lse_arg = args[6] if "efficient" in bwd_name else args[5]
    expected_rows = 64 if "efficient" in bwd_name else 40  # mem-efficient wants its padded lse back
    assert lse_arg.shape == (2, 4, expected_rows) and kwargs["scale"] == 0.25
