"""Where the benchmarks run: bf16 on CUDA when there is a GPU, fp32 on the CPU otherwise."""

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEVICE_NAME = torch.cuda.get_device_name() if CUDA else "cpu"
