"""ImageNet normalisation, the one every loader applies (in [0, 1] units; × 255 for uint8 input)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
