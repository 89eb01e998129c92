"""The maths: subpixel tokenizer, SPoT ViT, spatial priors, kNN, cost, saliency, devices (torch and timm only)."""
