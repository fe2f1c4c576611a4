"""Attention: one function, three paths, one mask.

* `flex`: FlexAttention compiled with `torch.compile` (tinyalign/flex.py). The mask is a tiny Python
  `mask_mod(b, h, q_idx, kv_idx) -> bool` that the compiler fuses into the kernel, so padding,
  causality and packing cost no [T, T] tensor at all. The GPU's path.
* `sdpa`: the same `mask_mod` evaluated into a dense boolean mask, through
  `F.scaled_dot_product_attention`. The CPU's path: FlexAttention has no backward pass on CPU
  (torch 2.13), and its compiled CPU forward is 5-45x slower than SDPA at the demo's sizes
  (measured on 2 cores, torch 2.13, 2026-11-26: 7.2 ms vs 0.16 ms for the demo tower's 16 images x
  4 heads x 17 tokens; 13.3 vs 2.4 ms for 32 rows x 4 heads x 70 decoder tokens), because lengths
  are padded to the 128-token bucket and such small kernels pay the compiled path's overhead.
* `eager`: the textbook softmax(QK^T / sqrt(d)) V on the dense mask. It is kept as the reference
  the tests hold the fast paths to, nothing else.

`model.attn_backend = "auto"` (the default) takes `flex` on CUDA and `sdpa` elsewhere; the tests set
`"flex"` to run FlexAttention on the CPU too (forward only) and hold it to the reference.

The model builds one `AttentionMask` per forward pass and `prepare()`s it once; every layer then
calls `attend(q, k, v, prepared)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from . import flex


@dataclass
class AttentionMask:
    """Which keys each query may see.

    key_valid: [B, S] bool, False for padding keys (None: all valid).
    causal: query i sees key j only if j <= i + query_offset.
    query_offset: [] long tensor, the key index of query 0 (non-zero when decoding with a KV cache).
        A tensor, not an int, so a compiled kernel does not specialise on the decoding step.
    document: [B, S] long, packed rows only (tinyalign/packing.py): a token sees only its own document.
    branch: [B, S] long, packed DPO pairs: 0 shared prompt, 1 chosen, 2 rejected; a token sees the
        shared prompt and its own branch, so the two answers never see each other.
    """

    key_valid: torch.Tensor | None = None
    causal: bool = True
    query_offset: torch.Tensor | None = None
    document: torch.Tensor | None = None
    branch: torch.Tensor | None = None

    def mask_mod(self):
        key_valid, causal, document, branch = self.key_valid, self.causal, self.document, self.branch
        offset = self.query_offset if self.query_offset is not None else 0

        def mask_mod(b, h, q_idx, kv_idx):
            visible = key_valid[b, kv_idx]
            if causal:
                visible = visible & (kv_idx <= q_idx + offset)
            if document is not None:
                visible = visible & (document[b, q_idx] == document[b, kv_idx])
            if branch is not None:
                visible = visible & ((branch[b, kv_idx] == 0) | (branch[b, kv_idx] == branch[b, q_idx]))
            return visible

        return mask_mod


@dataclass
class PreparedMask:
    """An AttentionMask in the form one backend consumes, built once and shared by all layers."""

    backend: str  # "flex", "sdpa" or "eager"
    q_len: int  # true lengths; the flex path pads up to a bucket and slices back
    kv_len: int
    q_padded: int = 0
    kv_padded: int = 0
    block_mask: BlockMask | None = None  # flex
    dense: torch.Tensor | None = None  # sdpa, eager: [B, 1, Q, KV] bool


def dense_mask(mask: AttentionMask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate the mask_mod on every (b, q, kv) at once by broadcasting: [B, 1, Q, KV] bool."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask.mask_mod()(b, 0, q, kv).expand(batch, 1, q_len, kv_len)


def prepare(mask: AttentionMask, batch: int, q_len: int, kv_len: int, device, backend: str = "flex") -> PreparedMask:
    device = torch.device(device)
    if mask.key_valid is None:
        mask = replace(mask, key_valid=torch.ones(batch, kv_len, dtype=torch.bool, device=device))
    if backend not in ("auto", "flex", "sdpa", "eager"):
        raise ValueError(f"attention backend must be 'auto', 'flex', 'sdpa' or 'eager', got {backend!r}")
    if backend == "auto":
        backend = "flex" if device.type == "cuda" else "sdpa"  # the fast path of each device (see above)
    if backend == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        backend = "sdpa"  # no FlexAttention backward on CPU: the same mask, dense, through SDPA
    if backend != "flex":
        return PreparedMask(backend, q_len, kv_len, dense=dense_mask(mask, batch, q_len, kv_len, device))
    block_mask, q_padded, kv_padded = flex.block_mask(mask, batch, q_len, kv_len, device)
    return PreparedMask("flex", q_len, kv_len, q_padded, kv_padded, block_mask=block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PreparedMask) -> torch.Tensor:
    """q: [B, H, Q, D]; k, v: [B, H_kv, KV, D] with H a multiple of H_kv (GQA). Returns [B, H, Q, D]."""
    if mask.backend == "eager":
        return eager_attention(q, k, v, mask.dense)
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=q.shape[1] != k.shape[1])
    return flex.attend(q, k, v, mask.block_mask, mask.q_len, mask.q_padded, mask.kv_padded)


def eager_attention(q, k, v, dense_mask):
    """Reference path. A query that sees no key at all (padding) outputs zeros, as FlexAttention does."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, KV, D]
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, Q, KV]
    scores = scores.masked_fill(~dense_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows give NaN -> 0
    return (probs @ v.float()).to(q.dtype)
