"""Vision Transformer (ViT / DeiT) as a MindSpore Cell.

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.N.norm1`, `blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.mlp.fc1/fc2`,
`norm`, `head`), except that MindSpore's LayerNorm calls its affine parameters
`gamma`/`beta` instead of `weight`/`bias`. The two matrix products of the attention are
Cells of their own (`attn.matmul1` = Q·Kᵀ, `attn.matmul2` = attn·V) so that quantized
versions can be swapped in by name.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, TruncatedNormal, Zero, One

from .. import kernels


# Operations chosen for MindSpore's CPU backend in GRAPH mode (2.10). The outputs of Div (`/`),
# Transpose and a broadcasting Add of a bias never have their memory reused within a graph, so
# each one keeps its own buffer for the whole forward pass (ten divisions of a DeiT-S MLP
# activation at batch 32: 1.5 GB in an ad-hoc check). RealDiv, BiasAdd and MatMul with transpose_b compute the same
# values, bit for bit, and their memory is reused. The attention's transpositions of the heads
# use a fused kernel (src/kernels) where available: mint.permute's memory is reused, but the
# copies it implies take about 4x the time of Transpose. The patch embedding's transpositions
# (once per forward pass) stay Transpose.
_real_div = ops.RealDiv()
_matmul_t = ops.MatMul(transpose_b=True)


def divide(x, y):
    """x / y (the values of `/`, bit for bit; see above)."""
    return _real_div(x, y)


def dense(x, weight, bias=None):
    """x @ weightᵀ (+ bias) over the last axis of x (..., in), weight (out, in), as nn.Dense computes it."""
    shape = x.shape
    out = _matmul_t(x.reshape(-1, shape[-1]), weight)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(shape[:-1] + (weight.shape[0],))


class MatMul(nn.Cell):
    """Batched matrix product of two activations, `a @ b` (or `a @ bᵀ`).

    a: (..., M, K); b: (..., K, N), or (..., N, K) with `transpose_b`.
    """

    def __init__(self, transpose_b=False):
        super().__init__()
        self.transpose_b = transpose_b
        self.bmm = ops.BatchMatMul(transpose_b=transpose_b)

    def construct(self, a, b):
        return self.bmm(a, b)


def patch_conv(x, weight, bias, patch):
    """Convolution with kernel = stride = `patch` and no padding, as one matrix product:
    x (B, C, H, W), weight (D, C, p, p) -> (B, D, H/p, W/p). MindSpore's CPU Conv2d kernel takes
    about 80x longer for this shape (6.5 s vs 0.08 s for 32 images at 224, DeiT-S, in an ad-hoc
    timing on 2 CPU cores)."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    cols = x.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * patch * patch)
    out = _matmul_t(cols, weight.reshape(weight.shape[0], -1))
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(b, gh, gw, -1).transpose(0, 3, 1, 2)


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and names) for non-overlapping patches, computed by patch_conv."""

    def __init__(self, in_channels, out_channels, patch_size, has_bias=True):
        super().__init__(in_channels, out_channels, patch_size, stride=patch_size, pad_mode="valid",
                         has_bias=has_bias)
        self.patch = patch_size

    def construct(self, x):
        return patch_conv(x, self.weight, self.bias if self.has_bias else None, self.patch)


class PatchEmbed(nn.Cell):
    """Image (B, C, H, W) -> patch tokens (B, N, D) with a strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size * self.grid_size
        self.proj = PatchConv2d(in_chans, embed_dim, patch_size, has_bias=True)

    def construct(self, x):
        x = self.proj(x)
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).transpose(0, 2, 1)


class Attention(nn.Cell):
    """Multi-head self-attention; scores are scaled by head_dim^-0.5 after Q·Kᵀ."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Dense(dim, dim * 3, has_bias=qkv_bias)
        self.matmul1 = MatMul(transpose_b=True)
        self.softmax = nn.Softmax(axis=-1)
        self.matmul2 = MatMul()
        self.proj = nn.Dense(dim, dim)
        self.heads_t = kernels.permute0213_op()  # fused CPU transposition of the heads (src/kernels), or None
        self.qkv_t = kernels.split_heads_op()  # fused CPU split of Q, K, V with that transposition, or None
        self.heads_t_cfg = kernels.config()

    def swap_heads(self, x):
        """(b, n, heads, d) <-> (b, heads, n, d). The fused CPU kernel where available: the same values
        as Transpose at its speed, with its memory reused (see above)."""
        if self.heads_t is not None:
            return self.heads_t(x, self.heads_t_cfg)
        return ops.transpose(x, (0, 2, 1, 3))

    def construct(self, x):
        b, n, c = x.shape
        # split Q, K, V on the channel axis, then (b, n, heads, d) -> (b, heads, n, d): the same
        # values as indexing a (3, b, heads, n, d) transpose, without MindSpore's CPU StridedSlice
        # (about 33 ms per slice for DeiT-S at batch 32, a third of the forward pass)
        if self.qkv_t is not None:
            q, k, v = self.qkv_t(self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim), self.heads_t_cfg)
        else:
            q, k, v = ops.split(self.qkv(x), c, axis=-1)
            q, k, v = (self.swap_heads(t.reshape(b, n, self.num_heads, self.head_dim)) for t in (q, k, v))
        attn = self.matmul1(q, k) * self.scale
        attn = self.softmax(attn)
        x = self.matmul2(attn, v)
        x = self.swap_heads(x).reshape(b, n, c)
        return self.proj(x)



class GELU(nn.Cell):
    """Exact (erf) GELU, the formula of `ops.gelu(x, approximate='none')` in the same operation
    order, 0.5·(x·(1 + erf(x / √2))), with the division through `divide` (same values, memory
    reused)."""

    def __init__(self):
        super().__init__()
        self.sqrt2 = Tensor(np.sqrt(np.float32(2.0)), ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.half = Tensor(0.5, ms.float32)
        self.fused = kernels.gelu_op()  # one fused CPU pass with the same values, or None (src/kernels)
        self.fused_cfg = kernels.config(np.sqrt(np.float32(2.0)))

    def construct(self, x):
        if self.fused is not None:
            return self.fused(x, self.fused_cfg)
        return x * (ops.erf(divide(x, self.sqrt2)) + self.one) * self.half


class Mlp(nn.Cell):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Dense(dim, hidden_dim)
        self.act = GELU()
        self.fc2 = nn.Dense(hidden_dim, dim)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Cell):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm((dim,), epsilon=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm((dim,), epsilon=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Cell):
    """ViT/DeiT classifier. construct(x): float32 (B, in_chans, H, W) -> logits (B, num_classes)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, eps=1e-6):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = Parameter(initializer(TruncatedNormal(0.02), (1, 1, embed_dim), ms.float32),
                                   name="cls_token")
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, num_tokens, embed_dim), ms.float32),
                                   name="pos_embed")
        self.blocks = nn.CellList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm((embed_dim,), epsilon=eps)
        self.head = nn.Dense(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """timm-style init: truncated normal (std 0.02) linear weights, zero biases."""
        for name, cell in self.cells_and_names():
            if isinstance(cell, nn.Dense):
                cell.weight.set_data(initializer(TruncatedNormal(0.02), cell.weight.shape, ms.float32))
                if cell.bias is not None:
                    cell.bias.set_data(initializer(Zero(), cell.bias.shape, ms.float32))
            elif isinstance(cell, nn.LayerNorm):
                cell.gamma.set_data(initializer(One(), cell.gamma.shape, ms.float32))
                cell.beta.set_data(initializer(Zero(), cell.beta.shape, ms.float32))
            elif isinstance(cell, nn.Conv2d):
                fan_in = int(np.prod(cell.weight.shape[1:]))
                bound = 1.0 / math.sqrt(fan_in)
                w = np.random.uniform(-bound, bound, cell.weight.shape).astype(np.float32)
                cell.weight.set_data(Tensor(w))
                cell.bias.set_data(initializer(Zero(), cell.bias.shape, ms.float32))

    def embed(self, x):
        """Images (B, C, H, W) -> tokens (B, 1 + N, D): patch embedding, cls token, position embedding."""
        x = self.patch_embed(x)
        cls = ops.broadcast_to(self.cls_token, (x.shape[0], 1, self.embed_dim))
        return ops.concat((cls, x), axis=1) + self.pos_embed

    def forward_head(self, x):
        """Tokens (B, 1 + N, D) -> logits (B, num_classes): final norm, classifier on the cls token."""
        return self.head(self.norm(x)[:, 0])

    def construct(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.forward_head(x)
