"""Quickstart: a megatron-core GPTModel trained step with USP (u=2, r=2) on 4 CPU ranks.

    torchrun --nproc-per-node 4 examples/megatron_quickstart.py
"""
import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_usp.megatron import (
    destroy_model_parallel,
    enable_cpu_mode,
    get_batch_on_this_usp_rank,
    get_gpt_layer_local_spec,
    initialize_model_parallel,
)

dist.init_process_group("gloo")  # "nccl" on GPUs
enable_cpu_mode()  # no-op when CUDA is available
initialize_model_parallel(tensor_model_parallel_size=1, ulysses_degree=2, ring_degree=2, ring_impl="zigzag")

config = TransformerConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, context_parallel_size=4,
    use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
    apply_rope_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
)
torch.manual_seed(0)
model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                 max_sequence_length=256, position_embedding_type="rope")

tokens = torch.randint(0, 128, (2, 257), generator=torch.Generator().manual_seed(1))
batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(256).expand(2, 256)}
batch = get_batch_on_this_usp_rank(batch)  # this rank's 64 tokens, in Megatron's zigzag CP layout
losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [2, 64] per-token losses
losses.sum().backward()  # gradients: all-reduce over dp x cp as Megatron's DDP does

total = losses.detach().sum()
dist.all_reduce(total)
if dist.get_rank() == 0:
    print(f"mean loss over the full sequence: {total.item() / (2 * 256):.4f}")
destroy_model_parallel()
dist.destroy_process_group()
