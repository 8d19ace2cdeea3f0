"""Vision transformers from timm (always randomly initialised)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedunlearn.harness.models.registry import register_model

__all__ = ["build_vit", "build_vit_tiny"]

VIT_B16_PATCH = 16


@register_model("vit")
def build_vit(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build timm's ViT-B/16 (``vit_base_patch16_224``) without pretrained weights.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Number of input channels.
    image_size : int
        Input height/width; must be a multiple of the patch size 16.
    **kwargs
        Forwarded to :func:`timm.create_model`.

    Returns
    -------
    torch.nn.Module
        The ViT-B/16; its first layer is ``patch_embed.proj``.

    Raises
    ------
    ValueError
        If ``image_size`` is not a multiple of 16.
    """
    if image_size % VIT_B16_PATCH != 0:
        raise ValueError(
            f"model 'vit' (ViT-B/16) needs an image_size that is a multiple of {VIT_B16_PATCH}, "
            f"got {image_size}; use 'vit_tiny' for small images (e.g. 8x8 digits) "
            "or resize the images"
        )
    import timm  # imported here: timm pulls in torchvision (slow ClientApp start-up)

    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=image_size,
        in_chans=in_channels,
        **kwargs,
    )


@register_model("vit_tiny")
def build_vit_tiny(
    num_classes: int,
    in_channels: int,
    image_size: int,
    patch_size: int | None = None,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a small timm ``VisionTransformer`` that trains on a CPU in minutes.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Number of input channels.
    image_size : int
        Input height/width; must be a multiple of ``patch_size``.
    patch_size : int, optional
        Patch size; defaults to 2 for ``image_size <= 16`` and 4 otherwise.
    embed_dim, depth, num_heads : int, optional
        Transformer width, number of blocks and attention heads.
    mlp_ratio : float, optional
        Hidden/embedding width ratio of the block MLPs.
    **kwargs
        Forwarded to :class:`timm.models.vision_transformer.VisionTransformer`.

    Returns
    -------
    torch.nn.Module
        The transformer; its first layer is ``patch_embed.proj``.

    Raises
    ------
    ValueError
        If ``image_size`` is not a multiple of ``patch_size``.
    """
    if patch_size is None:
        patch_size = 2 if image_size <= 16 else 4
    if image_size % patch_size != 0:
        raise ValueError(
            f"model 'vit_tiny' needs an image_size that is a multiple of its patch size "
            f"{patch_size}, got {image_size}; pass patch_size=... or resize the images"
        )
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        **kwargs,
    )
