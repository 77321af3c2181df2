"""Model configurations: the four released sizes, and configs read from JSON."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UnifiedIOConfig:
    """Transformer hyper-parameters; field names and defaults follow the reference."""

    vocab_size: int = 33152
    image_vocab_size: int = 16384
    image_patch_size: int = 16
    dtype: str = "float32"
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    logits_via_embedding: bool = True
    float32_attention_logits: bool = False
    encoder_max_image_length: int = 576
    encoder_max_text_length: int = 256
    decoder_max_image_length: int = 256
    decoder_max_text_length: int = 256
    visual_backbone_type: str | None = None
    visual_backbone_feature: str | None = None
    default_image_size: tuple[int, int] = (384, 384)
    num_seg_emb: int = 2


@dataclass(frozen=True)
class VAEConfig:
    """VQGAN hyper-parameters; field names follow the reference."""

    embed_dim: int = 256
    n_embed: int = 16384
    double_z: bool = False
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    dtype: str = "float32"


VAE_CONFIG = VAEConfig()

CONFIGS: dict[str, UnifiedIOConfig] = {
    "small": UnifiedIOConfig(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, mlp_dim=1024),
    "base": UnifiedIOConfig(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12, mlp_dim=2048),
    "large": UnifiedIOConfig(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24,
                             mlp_dim=2816),
    "xl": UnifiedIOConfig(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24, mlp_dim=5120,
                          num_seg_emb=8),
}


def _from_dict(cls, values: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**converted)


def load_config(size_or_path: str | os.PathLike) -> tuple[UnifiedIOConfig, VAEConfig]:
    """Return the (transformer, VQGAN) configs for a size name or a JSON file.

    The JSON format is that of the conformance ``tiny/config.json`` and the manifests:
    ``{"config": {...}, "vae_config": {...}}`` (extra top-level keys are ignored).
    """
    if str(size_or_path) in CONFIGS:
        return CONFIGS[str(size_or_path)], VAE_CONFIG
    path = Path(size_or_path)
    if not path.is_file():
        raise ValueError(f"unknown model size {str(size_or_path)!r}: expected one of "
                         f"{', '.join(CONFIGS)} or the path to a config JSON file")
    data = json.loads(path.read_text())
    if "config" not in data:
        raise ValueError(f"{path}: a config JSON needs a 'config' object (and optionally 'vae_config')")
    return _from_dict(UnifiedIOConfig, data["config"]), _from_dict(VAEConfig, data.get("vae_config", {}))


def config_to_dict(config: UnifiedIOConfig, vae_config: VAEConfig) -> dict:
    """The JSON-ready form that :func:`load_config` reads back."""
    return {"config": dataclasses.asdict(config), "vae_config": dataclasses.asdict(vae_config)}


__all__ = ["UnifiedIOConfig", "VAEConfig", "CONFIGS", "VAE_CONFIG", "load_config", "config_to_dict"]
