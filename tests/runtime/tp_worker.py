"""Worker for test_cpu_adapter: one forward/backward of a tiny GPT under the given TP size.

Run as ``python -m torch.distributed.run --nproc_per_node=N tp_worker.py TP OUT.json``; rank 0
writes the loss and the global gradient norm to OUT.json.
"""

import json
import sys

import torch


def main() -> None:
    tp, out_path = int(sys.argv[1]), sys.argv[2]
    from nvfp4_megatron.runtime.cpu_adapter import is_cpu_adapter_installed
    from nvfp4_megatron.runtime.distributed import init_distributed, initialize_model_parallel

    info = init_distributed()
    initialize_model_parallel(tensor_model_parallel_size=tp)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=256, max_sequence_length=32,
    )
    data = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens, labels = data[:, :-1], data[:, 1:]
    pos = torch.arange(32).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    sq = torch.zeros(())
    for p in model.parameters():
        g = p.grad.float()
        # TP-duplicated params (norms) count once; TP-split params are summed over the group.
        if getattr(p, "tensor_model_parallel", False):
            part = g.pow(2).sum()
            torch.distributed.all_reduce(part, group=parallel_state.get_tensor_model_parallel_group())
            sq += part
        else:
            sq += g.pow(2).sum()
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"loss": loss.item(), "grad_norm": sq.sqrt().item(),
                       "adapter": is_cpu_adapter_installed(), "world": info.world_size,
                       "backend": info.comm_library}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
