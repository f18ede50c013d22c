"""Quickstart: USP attention on 4 CPU ranks, checked against attention on the full sequence.

    torchrun --nproc-per-node 4 examples/usp_attn_quickstart.py
"""
import torch
import torch.distributed as dist

import megatron_usp as usp

dist.init_process_group("gloo")  # "nccl" on GPUs
groups = usp.init_groups(ulysses_degree=2, ring_degree=2)  # 2 x 2 grid over the 4 ranks

torch.manual_seed(0)  # same full tensors on every rank, for the check below
batch, seq_len, heads, kv_heads, head_dim = 2, 64, 8, 2, 32
q = torch.randn(batch, seq_len, heads, head_dim)
k = torch.randn(batch, seq_len, kv_heads, head_dim)
v = torch.randn(batch, seq_len, kv_heads, head_dim)

# each rank keeps its zigzag shard of the sequence (dim 1) ...
q_local, k_local, v_local = (usp.shard(x, groups, ring_impl="zigzag").requires_grad_() for x in (q, k, v))
out_local = usp.usp_attn(q_local, k_local, v_local, groups, causal=True, ring_impl="zigzag")
out_local.sum().backward()  # dq/dk/dv arrive in q_local.grad, k_local.grad, v_local.grad

# ... and together they give exactly full-sequence attention
out = usp.unshard(out_local.detach(), groups, ring_impl="zigzag")
expected = torch.nn.functional.scaled_dot_product_attention(
    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
).transpose(1, 2)
if dist.get_rank() == 0:
    print(f"positions on rank 0: {usp.positions(seq_len, groups, ring_impl='zigzag').tolist()}")
    print(f"max |usp - full| = {(out - expected).abs().max():.2e}")
dist.destroy_process_group()
