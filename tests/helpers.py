"""Small test utilities shared across test folders (import as `helpers`)."""
def solid_image(rgb, size=(56, 56)):
    from PIL import Image
    return Image.new("RGB", size, tuple(rgb))


def noise_image(seed, size=(112, 84)):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
