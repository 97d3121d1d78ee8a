"""Model size tables: sizes are data, not classes.

`VIT_SIZES` are TiTok's encoder/decoder presets (official `small`/`base`/`large`) plus tiny ones
for tests and the CPU demo.
"""

VIT_SIZES: dict[str, dict[str, int]] = {
    # name:   width, depth, heads, MLP hidden (4x width, head dim 64 for the official sizes)
    "nano": dict(width=32, depth=1, num_heads=2, mlp_dim=128),
    "tiny": dict(width=128, depth=2, num_heads=4, mlp_dim=512),
    "mini": dict(width=192, depth=4, num_heads=3, mlp_dim=768),
    "small": dict(width=512, depth=8, num_heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def vit_size(name: str) -> dict[str, int]:
    if name not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {name!r}; known sizes: {sorted(VIT_SIZES)}.")
    return dict(VIT_SIZES[name])
