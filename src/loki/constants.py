"""Defaults shared by the LoKI workflow (same values as the original project)."""

DEFAULT_IG_STEPS = 7
DEFAULT_IG_METHOD = "riemann_trapezoid"  # the Captum-based original's default; the paper used riemann_left
DEFAULT_QUOTA = 10.0
DEFAULT_STRATEGY = "layer_balanced"
