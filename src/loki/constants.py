"""Defaults of the LoKI workflow (the original project's ``loki.constants``), taken from ``loki_kernels``.

``DEFAULT_IG_METHOD`` is the paper's ``riemann_left`` (``loki analyse``'s default); the original's HEAD
constant said ``riemann_trapezoid``, the default of its Captum-based script.
"""

from loki_kernels.kva import DEFAULT_METHOD, DEFAULT_STEPS
from loki_kernels.selection import STRATEGIES

DEFAULT_IG_STEPS = DEFAULT_STEPS
DEFAULT_IG_METHOD = DEFAULT_METHOD
DEFAULT_QUOTA = 10.0
DEFAULT_STRATEGY = STRATEGIES[0]  # layer_balanced
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")  # what a model may be loaded as (--torch-dtype)
