"""A small torchvision VisionTransformer with seeded initial weights, head included.

torchvision initialises a VisionTransformer's classification head to zeros, so an untrained
ViT outputs all zeros for every image and any comparison with it scores perfectly. This builder
draws the head from N(0, 0.02) (seeded by the model source's ``seed``) so the logits vary with
the input. The weights are initialised, not trained: the recipe verifies agreement with this
float model, not accuracy.
"""

from __future__ import annotations

import torch
from torchvision.models.vision_transformer import VisionTransformer


def seeded_vit(image_size: int = 224, patch_size: int = 16, num_layers: int = 4, num_heads: int = 6,
               hidden_dim: int = 384, mlp_dim: int = 1536, num_classes: int = 1000) -> torch.nn.Module:
    """A ViT (input ``(N, 3, image_size, image_size)`` float32, output ``(N, num_classes)`` logits)
    whose head is initialised with N(0, 0.02) instead of torchvision's zeros."""
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    head = model.heads.head
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.normal_(head.bias, std=0.02)
    return model
