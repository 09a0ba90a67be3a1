"""Runtime paths of an MoEFFN: Σ_e mask[t, e] · y_e(x_t), computed four ways, chosen per call.

    reference  per expert: gather its tokens, three matmuls, index_add      (autograd; any device and dtype)
    decode     Triton, T ≤ 16 tokens: reads only the selected experts' weights, no sort,
               routing and activation fused, no host sync                     (CUDA, or TRITON_INTERPRET=1)
    grouped    tokens sorted by expert, one grouped GEMM per projection     (CPU; on CUDA prefill and batches)
    dense      the dense FFN over all experts with unselected neurons zeroed (the union covers most experts;
               any T in CUDA-graph capture)

`moe_output(ffn, tokens, mask)` runs one: an MoEFFN (its tensors, activation and
operating point), tokens [T, d] and a boolean mask [T, E] (None: the router's selection)
give y = Σ_e mask[t, e] · y_e(x_t) + b_out [T, d] in the tokens' dtype.
`metanet.kernels.dispatch.choose_path` picks the path; `MoEFFN.kernel` forces one.
Triton is imported only by the decode path.
"""

from metanet.kernels.dispatch import PATHS, choose_path, moe_output

__all__ = ["PATHS", "choose_path", "moe_output"]
