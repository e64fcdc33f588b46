"""One vocabulary for the diffusers model families vidattn knows.

Canonical family names: ``"wan" | "hunyuan_video" | "cogvideox" | "ltx_video" | "flux"``. The
same names are used by :func:`detect_family` (pipelines and transformers), ``vidattn.apply``,
the layout discovery and the CLI. Short aliases (``"hunyuan"``, ``"ltx"``) are accepted by
:func:`canonical_family` only.

Mochi is *rejected* everywhere, with the same error: its transformer (``MochiTransformer3DModel``)
runs its own ``MochiAttnProcessor2_0`` (joint attention with per-sample variable-length text,
packed through ``torch.nn.functional`` calls of its own), which vidattn has no token-layout
discovery for. ``detect_family`` raises :class:`UnsupportedModelError` for it, and so does
``vidattn.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["FamilyInfo", "FAMILIES", "FAMILY_NAMES", "UnsupportedModelError", "canonical_family", "detect_family",
           "family_info", "transformer_family"]


class UnsupportedModelError(TypeError):
    """A pipeline / transformer vidattn cannot serve (unknown family, or Mochi)."""


@dataclass(frozen=True)
class FamilyInfo:
    """What vidattn needs to know about one family.

    Attributes:
        name: canonical family name.
        grid_rank: 3 (``(T, H, W)`` video latents) or 2 (``(H, W)``, FLUX).
        text: where joint text sits in self-attention: ``"prefix"``, ``"suffix"`` or None (separate
            cross-attention).
        dispatcher: True when the family's attention processors call diffusers'
            ``dispatch_attention_fn`` (then vidattn runs as a registered attention backend); False
            for processors that call ``F.scaled_dot_product_attention`` themselves (CogVideoX).
        cp_text_split: under diffusers context parallelism the joint text is split across ranks
            together with the image tokens, so each rank's self-attention sequence is
            ``[text shard, image shard]`` (FLUX's ``_cp_plan`` splits ``encoder_hidden_states``).
        transformers: transformer class names of the family.
        pipelines: pipeline class names of the family.
    """

    name: str
    grid_rank: int
    text: Optional[str]
    dispatcher: bool
    cp_text_split: bool
    transformers: tuple
    pipelines: tuple


FAMILIES: Dict[str, FamilyInfo] = {
    "wan": FamilyInfo("wan", 3, None, True, False, ("WanTransformer3DModel", "WanVACETransformer3DModel"),
                      ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline")),
    "hunyuan_video": FamilyInfo("hunyuan_video", 3, "suffix", True, False, ("HunyuanVideoTransformer3DModel",),
                                ("HunyuanVideoPipeline",)),
    "cogvideox": FamilyInfo("cogvideox", 3, "prefix", False, False, ("CogVideoXTransformer3DModel",),
                            ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")),
    "ltx_video": FamilyInfo("ltx_video", 3, None, True, False, ("LTXVideoTransformer3DModel",),
                            ("LTXPipeline", "LTXImageToVideoPipeline")),
    "flux": FamilyInfo("flux", 2, "prefix", True, True, ("FluxTransformer2DModel",),
                       ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline")),
}
FAMILY_NAMES = tuple(sorted(FAMILIES))
_ALIASES = {"hunyuan": "hunyuan_video", "hunyuanvideo": "hunyuan_video", "ltx": "ltx_video", "ltxvideo": "ltx_video",
            "cogvideo": "cogvideox", "wan2.1": "wan", "wan21": "wan"}
_REJECTED = {"mochi": ("MochiTransformer3DModel", "MochiPipeline"),
             }
_REJECT_REASON = {"mochi": "Mochi is not supported: MochiAttnProcessor2_0 packs per-sample variable-length text "
                           "itself and vidattn has no token-layout discovery for it"}
_BY_CLASS = {c: f.name for f in FAMILIES.values() for c in f.transformers + f.pipelines}
_REJECT_BY_CLASS = {c: n for n, cs in _REJECTED.items() for c in cs}


def canonical_family(name: str) -> str:
    """Canonical family name for ``name`` (aliases such as ``"hunyuan"``/``"ltx"`` accepted).
    Raises :class:`UnsupportedModelError` for Mochi and unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"family must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in FAMILIES:
        return key
    if key in _REJECT_REASON:
        raise UnsupportedModelError(_REJECT_REASON[key])
    raise UnsupportedModelError(f"unknown model family {name!r}; supported: {', '.join(FAMILY_NAMES)}")


def transformer_family(obj) -> Optional[str]:
    """Canonical family of a transformer or pipeline instance (by class, MRO included), None if
    unknown. Raises :class:`UnsupportedModelError` for a rejected family (Mochi)."""
    for cls in type(obj).__mro__:
        n = cls.__name__
        if n in _BY_CLASS:
            return _BY_CLASS[n]
        if n in _REJECT_BY_CLASS:
            raise UnsupportedModelError(_REJECT_REASON[_REJECT_BY_CLASS[n]])
    return None


def detect_family(obj) -> str:
    """Canonical family of a diffusers pipeline (by its class, or its ``transformer``) or
    transformer. Raises :class:`UnsupportedModelError` (a ``TypeError``) otherwise."""
    fam = transformer_family(obj)
    if fam is None and getattr(obj, "transformer", None) is not None:
        fam = transformer_family(obj.transformer)
    if fam is None:
        raise UnsupportedModelError(f"vidattn has no integration for {type(obj).__name__}; supported families: "
                                    f"{', '.join(FAMILY_NAMES)}")
    return fam


def family_info(obj_or_name) -> FamilyInfo:
    """:class:`FamilyInfo` of a family name, pipeline or transformer."""
    if isinstance(obj_or_name, str):
        return FAMILIES[canonical_family(obj_or_name)]
    return FAMILIES[detect_family(obj_or_name)]
