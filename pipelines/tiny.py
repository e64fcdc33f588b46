"""The built-in tiny Wan-style pipeline: offline, random weights, a real tokenizer.

``build_tiny_wan()`` returns a diffusers ``WanPipeline`` made of a tiny ``WanTransformer3DModel``,
a tiny ``AutoencoderKLWan``, a tiny ``UMT5EncoderModel`` (all from configs, seeded random weights)
and a byte-level BPE tokenizer trained by :func:`train_tokenizer` on the small built-in corpus
below and shipped as ``assets/tiny_tokenizer/tokenizer.json``. Nothing is downloaded; the weights
carry no learned structure (use ``--model reference`` for that), but the whole diffusers path —
tokenizer, text encoder, cross-attention, denoising loop, VAE decode — is exercised, so different
prompts give different videos.

Regenerate the tokenizer asset with ``python -m vidattn.pipelines.tiny --write-tokenizer``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

__all__ = ["TINY_TRANSFORMER", "TINY_VAE", "TINY_TEXT_ENCODER", "TOKENIZER_FILE", "CORPUS", "train_tokenizer",
           "load_tokenizer", "build_tiny_wan"]

TOKENIZER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_tokenizer.json")
VOCAB_SIZE = 512
MAX_SEQUENCE_LENGTH = 32  # tokens per prompt given to the text encoder (pipeline call kwarg)

# Small built-in corpus (written for this project) the BPE merges are learned from.
CORPUS = [
    "a red ball bouncing on a wooden floor",
    "a blue square rotating slowly in the middle of the frame",
    "a cat walking across a sunny garden",
    "waves rolling onto a sandy beach at sunset",
    "a car driving down a city street at night with bright lights",
    "a bird flying over green mountains and a river",
    "a person riding a bicycle through a park in autumn",
    "snow falling on a quiet forest road",
    "a spinning yellow wheel on a dark background",
    "two circles moving apart and then together again",
    "a drone shot over a busy harbour with small boats",
    "a timelapse of clouds moving over a field of flowers",
    "a dog running on the grass and catching a frisbee",
    "rain drops on a window with city lights behind",
    "a train passing through a tunnel in the mountains",
    "the camera pans left across a kitchen table with fruit",
    "a candle flame flickering in a dark room",
    "fish swimming in a clear blue ocean near a coral reef",
    "a rocket launching into the sky with smoke and fire",
    "leaves blowing in the wind under a grey sky",
]

TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_TEXT_ENCODER = dict(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                         feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def train_tokenizer(corpus=None, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``corpus`` (list of str; default
    :data:`CORPUS`). Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>``; every encoding ends with ``</s>``.
    Byte-level: any text encodes without unknown tokens, so every prompt change changes the ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = CORPUS if corpus is None else corpus
    if not isinstance(corpus, (list, tuple)) or not all(isinstance(s, str) for s in corpus):
        raise TypeError("corpus must be a list of str")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")


def load_tokenizer():
    """The shipped tokenizer as a ``transformers.PreTrainedTokenizerFast`` (trained on the fly if the
    asset is missing, e.g. in a checkout where it was deleted)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER_FILE) if os.path.exists(TOKENIZER_FILE) else train_tokenizer()
    return _wrap(tok)


def build_tiny_wan(seed: int = 0, dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """Build the tiny offline ``diffusers.WanPipeline`` (random weights seeded by ``seed``).

    The VAE compresses 4x in time and 8x in space, the transformer patches 2x2, so a video of
    ``F`` frames (``F = 4k + 1``), ``H x W`` (multiples of 16) gives a token grid
    ``((F - 1) / 4 + 1, H / 16, W / 16)``. Returns the pipeline on ``device`` in ``dtype``.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**TINY_VAE)
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER))
        # random init of a T5 gives near-identical embeddings for all tokens; widen them so the
        # prompt visibly steers the (random) cross-attention
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=load_tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=scheduler, transformer=transformer.eval())
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="tiny offline pipeline assets")
    p.add_argument("--write-tokenizer", action="store_true", help="retrain and write assets/tiny_tokenizer.json")
    args = p.parse_args(argv)
    if args.write_tokenizer:
        os.makedirs(os.path.dirname(TOKENIZER_FILE), exist_ok=True)
        train_tokenizer().save(TOKENIZER_FILE)
        print(f"wrote {TOKENIZER_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
