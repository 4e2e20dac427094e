"""Tiny Stable-Diffusion-architecture pipelines built from configs, for tests, benchmarks and the offline demo.

Nothing here downloads: the tokenizer is a byte-level BPE trained locally on a word list, and every model is built
from a small config with seeded random weights. ``sample_data/image/make_base.py`` pretrains one of these into the
demo's base model.
"""

from __future__ import annotations

from typing import Any

#: words the tiny tokenizer learns as whole tokens; anything else still tokenizes (byte-level), just in pieces
VOCABULARY = (  # noqa: SIM905 (a word list reads better as text)
    "a an the of on in with and at by to for from over under near behind above below left right top bottom center "
    "small large big tiny round square circle circles square squares triangle triangles star stars stripe stripes "
    "ring rings dot dots line lines cross crosses diamond diamonds heart shape shapes pattern background "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta lime maroon olive violet "
    "navy teal sand gold golden cream coral beige dark light pale bright deep "
    "wave waves anchor anchors lighthouse boat sail ship sea ocean harbor harbour bank coin coins shield tower "
    "style brand logo poster icon card banner flat simple minimal picture image photo drawing painting "
    "sky sun moon cloud water beach rock bird fish house tree flower mountain road city night day"
).split()

#: the caption vocabulary the tiny tokenizer is trained on, repeated so every word becomes one token
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_tokenizer(words: tuple[str, ...] = VOCABULARY, max_length: int = 16) -> Any:
    """A CLIP tokenizer (byte-level BPE, ``</w>`` word ends) trained locally so that ``words`` are single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) * 2 + 8 * len(words) + len(_SPECIAL),
        special_tokens=list(_SPECIAL),
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        show_progress=False,
        min_frequency=1,
    )
    bpe.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    # every single byte with and without the word-end suffix keeps unseen words encodable
    for char in sorted(alphabet):
        for token in (char, char + "</w>"):
            if token not in vocab:
                vocab[token] = len(vocab)
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        merges = [
            tuple(line.split(" "))
            for line in Path(tmp, "merges.txt").read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#version")
        ]
        _ = json  # vocab comes from get_vocab above, extended with the byte symbols
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def tiny_unet_config(cross_attention_dim: int = 64, sample_size: int = 8, channels: tuple[int, ...] = (48, 96)) -> dict:
    """UNet2DConditionModel config with cross-attention at every level (so LoRA has attention to adapt)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def tiny_vae_config(sample_size: int = 32) -> dict:
    """AutoencoderKL config with a downsampling factor of 4 and 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size,
    )


def tiny_text_config(vocab_size: int, max_length: int = 16, hidden: int = 64) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", resolution: int = 32, xl: bool = False) -> Any:
    """A randomly initialised tiny SD (or SDXL, with ``xl=True``) pipeline; same ``seed`` gives the same weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(**tiny_text_config(len(tokenizer), tokenizer.model_max_length))
    vae = AutoencoderKL(**tiny_vae_config(resolution))
    scheduler = DDIMScheduler(**tiny_scheduler_config(prediction_type))
    if not xl:
        unet = UNet2DConditionModel(**tiny_unet_config(sample_size=resolution // 4))
        text_encoder = CLIPTextModel(text_config)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    # SDXL: the UNet sees both encoders' hidden states concatenated, plus pooled text and six size/crop ids
    hidden = text_config.hidden_size
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    time_dim = 8
    config = tiny_unet_config(cross_attention_dim=hidden * 2, sample_size=resolution // 4)
    config.update(
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=hidden + 6 * time_dim,
    )
    unet = UNet2DConditionModel(**config)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
