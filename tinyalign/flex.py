"""FlexAttention compiled with torch.compile: the GPU's attention path (attention.py dispatches here).

FlexAttention (`torch.nn.attention.flex_attention`) takes the mask as a tiny Python function,
`mask_mod(b, h, q_idx, kv_idx) -> bool` (attention.AttentionMask writes it), and the compiler fuses it
into the attention kernel: padding, causality and packing cost no [T, T] tensor at all. A
`BlockMask` made once per forward lists which [128 x 128] tiles are fully masked, so the kernel
skips them.

Compiled kernels are specialised to shapes, so lengths are rounded up to a bucket of 128: one compiled
kernel serves every length in it (each new length would otherwise compile again). Padded keys are
masked, padded queries are sliced off. This is the one fast path the design card writes into the
core; the rest of speed lives in tinyalign/speed/.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

LENGTH_BUCKET = 128


def padded_length(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def block_mask(mask, batch: int, q_len: int, kv_len: int, device) -> tuple[BlockMask, int, int]:
    """An attention.AttentionMask over lengths rounded up to the bucket -> (its BlockMask, padded query
    length, padded key length). A single query (a decoding step) is left alone: its shape never changes."""
    q_pad = q_len if q_len == 1 else padded_length(q_len)
    kv_pad = padded_length(kv_len)

    def pad(t, value):  # packed rows: the query side indexes these too, so pad to the larger length
        return None if t is None else F.pad(t, (0, max(q_pad, kv_pad) - t.shape[1]), value=value)

    padded = replace(mask, key_valid=pad(mask.key_valid, False), document=pad(mask.document, -1),
                     branch=pad(mask.branch, 0))
    return create_block_mask(padded.mask_mod(), batch, None, q_pad, kv_pad, device=device), q_pad, kv_pad


_compiled = None


def compiled_flex_attention():
    """torch.compile(flex_attention), made on first use: without compiling, FlexAttention runs an
    unfused reference implementation that materialises the full score matrix."""
    global _compiled
    if _compiled is None:
        # Vision and text attention, training and decoding and several length buckets each
        # specialise the kernel once; allow for that many rather than falling back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def attend(q, k, v, mask: BlockMask, q_len: int, q_padded: int, kv_padded: int) -> torch.Tensor:
    """q [B, H, Q, D], k and v [B, H_kv, KV, D] padded to the bucket, attended, sliced back: [B, H, Q, D]."""
    q = F.pad(q, (0, 0, 0, q_padded - q.shape[2]))
    k = F.pad(k, (0, 0, 0, kv_padded - k.shape[2]))
    v = F.pad(v, (0, 0, 0, kv_padded - v.shape[2]))
    out = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, :q_len]
