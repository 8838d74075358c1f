"""Evaluation as the paper does it: images drawn per prompt and seed, scored by the community's metrics
(FID_CLIP, CLIPScore, PickScore, HPS v2, ImageReward, CMMD) reproduced in JAX, plus our subject recall."""
