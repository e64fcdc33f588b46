"""Tiny random-weight diffusers transformers (configs in the spirit of diffusers' own tests) and
matching inputs, for offline CPU tests of vidattn.apply / SparseAttnProcessor.

Each builder returns ``(model, inputs, grid)``: ``inputs`` are the forward kwargs and ``grid`` the
latent token grid after patchify that the layout hook must record.
"""

from __future__ import annotations

import torch


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def tiny_wan(frames=3, height=8, width=8, batch=1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    inputs = dict(hidden_states=_randn(batch, 4, frames, height, width, seed=1),
                  encoder_hidden_states=_randn(batch, 6, 16, seed=2),
                  timestep=torch.full((batch,), 500, dtype=torch.long), return_dict=False)
    return model, inputs, (frames, height // 2, width // 2)


def tiny_hunyuan(frames=3, height=6, width=6, batch=1, text=5, pad=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    mask = torch.ones(batch, text, dtype=torch.long)
    if pad:
        mask[:, text - pad:] = 0
    inputs = dict(hidden_states=_randn(batch, 4, frames, height, width, seed=1), timestep=torch.full((batch,), 500),
                  encoder_hidden_states=_randn(batch, text, 16, seed=2), pooled_projections=_randn(batch, 8, seed=3),
                  encoder_attention_mask=mask, guidance=torch.full((batch,), 3.0), return_dict=False)
    return model, inputs, (frames, height, width)


def tiny_cogvideox(frames=2, height=8, width=8, batch=1, text=4):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=width,
                                        sample_height=height, sample_frames=9, patch_size=2,
                                        temporal_compression_ratio=4, max_text_seq_length=text).eval()
    inputs = dict(hidden_states=_randn(batch, frames, 4, height, width, seed=1),
                  encoder_hidden_states=_randn(batch, text, 8, seed=2), timestep=torch.full((batch,), 500),
                  return_dict=False)
    return model, inputs, (frames, height // 2, width // 2)


def tiny_ltx(frames=3, height=6, width=6, batch=1):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       num_layers=2, caption_channels=16).eval()
    s = frames * height * width
    inputs = dict(hidden_states=_randn(batch, s, 4, seed=1), encoder_hidden_states=_randn(batch, 5, 16, seed=2),
                  timestep=torch.full((batch,), 500), encoder_attention_mask=torch.ones(batch, 5, dtype=torch.long),
                  num_frames=frames, height=height, width=width, return_dict=False)
    return model, inputs, (frames, height, width)


def tiny_flux(height=8, width=6, batch=1, text=4):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs = dict(hidden_states=_randn(batch, height * width, 4, seed=1),
                  encoder_hidden_states=_randn(batch, text, 32, seed=2), pooled_projections=_randn(batch, 32, seed=3),
                  timestep=torch.full((batch,), 0.5), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
                  return_dict=False)
    return model, inputs, (height, width)


BUILDERS = {"wan": tiny_wan, "hunyuan_video": tiny_hunyuan, "cogvideox": tiny_cogvideox, "ltx_video": tiny_ltx,
            "flux": tiny_flux}


def run(model, inputs):
    """One forward under no_grad; returns the output tensor."""
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def tiny_wan_pipeline():
    """A tiny ``WanPipeline`` (AutoencoderKLWan + T5 encoder + WanTransformer3DModel) built from
    configs, with no tokenizer (call it with ``prompt_embeds``). Returns ``(pipe, call_kwargs, grid)``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    text_encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=16,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=_randn(1, 6, 16, seed=5), negative_prompt_embeds=_randn(1, 6, 16, seed=6),
                  height=48, width=48, num_frames=9, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                  max_sequence_length=6)
    return pipe, kwargs, (3, 3, 3)


def run_pipe(pipe, kwargs, seed=0):
    """Run the pipeline with a fixed generator; returns the frames tensor."""
    with torch.no_grad():
        return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).frames


# ------------------------------------------------------------------ independent oracle
TEXT_POSITION = {"wan": None, "hunyuan_video": "suffix", "cogvideox": "prefix", "ltx_video": None, "flux": "prefix"}


def oracle_layout(grid, text_pos, S):
    """TokenLayout of a self-attention sequence of length S (text = S - prod(grid))."""
    from vidattn import TokenLayout

    n = 1
    for g in grid:
        n *= g
    extra = S - n
    return TokenLayout(grid, prefix=extra if text_pos == "prefix" else 0,
                       suffix=extra if text_pos == "suffix" else 0)


def make_oracle(pattern, grid, text_pos, heads=None):
    """Masked-SDPA stand-ins for diffusers' attention calls: self-attention over the latent grid
    uses ``pattern.mask(layout)`` (only on ``heads`` if given), anything else is plain SDPA.

    Returns ``(dispatch, functional)``: ``dispatch(q, k, v, ...)`` on ``[B, S, H, D]`` (replaces
    ``dispatch_attention_fn``) and a ``torch.nn.functional`` look-alike whose
    ``scaled_dot_product_attention`` works on ``[B, H, S, D]``.
    """
    import types

    import torch.nn.functional as F

    def bhsd(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        S, H = q.shape[2], q.shape[1]
        m = None
        n = 1
        for g in grid:
            n *= g
        if q.shape[2] == k.shape[2] and S >= n:
            m = pattern.mask(oracle_layout(grid, text_pos, S), num_heads=H)
            if m.shape[0] == 1:
                m = m.expand(H, S, S)
            if heads is not None:
                m = m.clone()
                for h in range(H):
                    if h not in heads:
                        m[h] = True
            m = m[None]
        if attn_mask is not None:
            am = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
            m = am if m is None else (m & am)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        out = bhsd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, scale=scale)
        return out.transpose(1, 2)

    functional = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    functional.scaled_dot_product_attention = bhsd
    return dispatch, functional


# Where the oracle replaces each family's attention call: diffusers' dispatch_attention_fn as the
# family's transformer module imported it (CogVideoX calls torch.nn.functional directly).
ORACLE_TARGET = {family: (f"diffusers.models.transformers.transformer_{module}", "dispatch_attention_fn")
                 for family, module in (("wan", "wan"), ("hunyuan_video", "hunyuan_video"), ("ltx_video", "ltx"),
                                        ("flux", "flux"))}
ORACLE_TARGET["cogvideox"] = ("diffusers.models.attention_processor", "F")
