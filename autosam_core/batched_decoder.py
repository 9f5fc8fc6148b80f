"""SAM's mask decoder for B images with B dense prompts in one call (issue 9, item 3).

segment_anything's ``MaskDecoder.predict_masks`` pairs every image with every prompt
(``repeat_interleave``) and its ``Attention`` splits heads with transposes that the matmuls then
copy; its ``LayerNorm2d`` is five element-wise passes over the upscaled map. This module runs the
same decoder weights with the same arithmetic (Kirillov et al. 2023, section 3 and appendix A:
two-way transformer, final token-to-image attention, output upscaling, hypernetwork MLP of mask
token 0) but image i meets prompt i only, attention through ``scaled_dot_product_attention``
(softmax(q k^T / sqrt(d)) v; on the CPU its composite kernel when a gradient is needed) and the upscaling in channels_last with a fused layer norm.
Equal to the per-sample loop of SAM's own code within 1e-5 in float32, gradients included
(tests/test_recipe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REQUIRED = ("iou_token", "mask_tokens", "transformer", "output_upscaling", "output_hypernetworks_mlps")


def is_sam_mask_decoder(decoder: torch.nn.Module) -> bool:
    """True when ``decoder`` has segment_anything ``MaskDecoder``'s internals (see :data:`REQUIRED`)."""
    return all(hasattr(decoder, a) for a in REQUIRED)


def _attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``Attention`` (q/k/v projections, heads, softmax(q k^T / sqrt(d)) v, out
    projection) with one fused attention kernel. q: (B, Nq, C), k and v: (B, Nk, C) -> (B, Nq, C)."""
    b, nq, _ = q.shape
    heads = attn.num_heads
    q = attn.q_proj(q)
    d = q.shape[-1] // heads
    q = q.view(b, nq, heads, d).transpose(1, 2)
    k = attn.k_proj(k).view(b, k.shape[1], heads, d).transpose(1, 2)
    v = attn.v_proj(v).view(b, v.shape[1], heads, d).transpose(1, 2)
    if q.device.type == "cpu" and q.requires_grad:
        # training on CPU: the composite (matmul, softmax, matmul) kernel, whose backward is 1.3x (fp32)
        # to 2.2x (bf16) faster than the flash kernel for SAM's shapes (7 tokens x 4096 pixels); without
        # a gradient the flash kernel is as fast or faster (bf16 forward 0.41 vs 0.47 s at batch 8)
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), as SAM
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(b, nq, heads * d))


def _block(layer: torch.nn.Module, queries, keys, query_pe, key_pe):
    """One ``TwoWayAttentionBlock``: token self-attention, tokens -> image, MLP, image -> tokens."""
    if layer.skip_first_layer_pe:
        queries = _attention(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + _attention(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)
    k = keys + key_pe
    queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe  # keys are unchanged since k was formed: SAM's second keys + key_pe equals k
    keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, k, q, queries))
    return queries, keys


def _layer_norm_2d(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``LayerNorm2d`` (per pixel over channels, biased variance, ``norm.eps``) as one fused
    ``layer_norm`` on the channels_last view. x: (B, C, H, W) -> same shape, channels_last."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


def _upscale(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``output_upscaling`` (ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU) in
    channels_last; other module types run as they are."""
    x = x.contiguous(memory_format=torch.channels_last)
    for m in seq:
        x = _layer_norm_2d(m, x) if type(m).__name__ == "LayerNorm2d" else m(x)
    return x


def decode_batched(decoder: torch.nn.Module, src: torch.Tensor, image_pe: torch.Tensor,
                   sparse_prompt_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Single-mask output (mask token 0) of a segment_anything ``MaskDecoder``, sample i alone.

    Args:
        decoder: a ``MaskDecoder`` (:func:`is_sam_mask_decoder`), frozen or not.
        src: (B, C, H, W) image_embeddings + dense_prompt_embeddings (SAM's ``src``), float, may
            require grad.
        image_pe: (1, C, H, W) ``prompt_encoder.get_dense_pe()``.
        sparse_prompt_embeddings: optional (B, N, C) tokens appended after the output tokens.

    Returns:
        low_res_logits (B, 1, 4H, 4W) in the autocast dtype, unbounded; no gradient between samples.
    """
    b, c, h, w = src.shape
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
    if sparse_prompt_embeddings is not None:
        tokens = torch.cat([tokens, sparse_prompt_embeddings.to(src.device, tokens.dtype)], dim=1)
    # channels_last: the (B, HW, C) token view of the image and the final (B, C, H, W) view are both free
    keys = src.contiguous(memory_format=torch.channels_last).flatten(2).transpose(1, 2)  # (B, HW, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, HW, C), broadcast over the batch
    tr = decoder.transformer
    queries = tokens
    for layer in tr.layers:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    queries = tr.norm_final_attn(queries + _attention(tr.final_attn_token_to_image, queries + tokens,
                                                      keys + key_pe, keys))
    upscaled = _upscale(decoder.output_upscaling, keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C', 4H, 4W)
    hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1, :])  # mask token 0: (B, C')
    _, cu, hu, wu = upscaled.shape
    pixels = upscaled.permute(0, 2, 3, 1).reshape(b, hu * wu, cu)  # contiguous: channels_last
    return (pixels @ hyper.unsqueeze(2)).reshape(b, 1, hu, wu)
