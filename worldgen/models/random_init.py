"""Seeded random weights built directly on the device, in the dtypes the models run in.

    dit = random_dit(config, "cuda", torch.bfloat16, seed=0)   # the layout set_compute_dtype(bf16) gives
    vae = random_vae(vae_config, "cuda", seed=0)                # float32, like the released VAE

The model is built on the meta device, put in its run dtypes there, and then every parameter is created on
the target device and filled in place, one tensor at a time: a full-size DiT (18.5 B parameters, ~37 GB in
bf16) never exists in float32 (~74 GB) and never passes through host memory. The same seed on the same
device gives the same weights.

The scale keeps a random 40-layer forward finite and of moderate size: weights of every Linear/Conv are
Gaussian with PyTorch's default standard deviation 1/sqrt(3 * fan_in), so each projection roughly keeps
(slightly shrinks) the size of its input and the camera modulation `x * (1 + scale)` stays near 1;
biases are zero, norm gains one, and the time-modulation tables N(0, 1/dim) as the model's own
constructor draws them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from worldgen.config import DiTConfig, VAEConfig
from worldgen.models import dit as dit_module
from worldgen.models import text as text_module
from worldgen.models import vae as vae_module
from worldgen.models.dit import CausalDiT
from worldgen.models.vae import WanVAE

_LAYERS = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_NORMS = nn.LayerNorm | dit_module.RMSNorm | vae_module.RMSNorm | text_module.RMSNorm


def _random_parameter(
    name: str, module: nn.Module, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator
) -> Tensor:
    """A new tensor for parameter `name` (its last part is the attribute) of `module`."""
    attribute = name.rsplit(".", 1)[-1]
    tensor = torch.empty(shape, dtype=dtype, device=generator.device)
    if isinstance(module, _LAYERS) and attribute == "weight":
        fan_in = shape[1:].numel()
        return tensor.normal_(0.0, (3 * fan_in) ** -0.5, generator=generator)
    if isinstance(module, _LAYERS | _NORMS) and attribute == "bias":
        return tensor.zero_()
    if isinstance(module, _NORMS) and attribute in ("weight", "gamma"):
        return tensor.fill_(1.0)
    if isinstance(module, nn.Embedding):  # token and relative-position embeddings of the text encoder
        return tensor.normal_(0.0, 1.0, generator=generator)
    if attribute == "modulation":
        return tensor.normal_(0.0, shape[-1] ** -0.5, generator=generator)
    raise ValueError(f"random_init: no rule for parameter {name!r} of {type(module).__name__}")


@torch.no_grad()
def materialize_random(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Give a meta-built `model` seeded random parameters on `device`, keeping each parameter's dtype.

    The new tensors are assigned through `load_state_dict(assign=True)`, so the model's load hooks run (the
    VAE rebuilds its latent statistics and weight layout there). Returned in eval mode, without gradients.
    """
    generator = torch.Generator(torch.device(device)).manual_seed(seed)
    state = {}
    for prefix, module in model.named_modules():
        for attribute, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{attribute}" if prefix else attribute
            state[name] = _random_parameter(name, module, param.shape, param.dtype, generator)
    model.load_state_dict(state, strict=True, assign=True)
    if left := [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"random_init: {left} still on the meta device after materialising")
    return model.eval().requires_grad_(False)


def random_dit(
    config: DiTConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> CausalDiT:
    """A CausalDiT with seeded random weights on `device`.

    `dtype` is the compute dtype: bf16 (or fp16) gives the layout of `set_compute_dtype(dtype)` (token-wise
    Linears in `dtype`, time MLP, modulation and norms in float32); float32 is all float32; float64 all
    float64 (tests).
    """
    with torch.device("meta"):
        model = CausalDiT(config)
    if dtype == torch.float64:
        model.double()
    else:
        model.set_compute_dtype(dtype)
    return materialize_random(model, device, seed)


def random_vae(
    config: VAEConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> WanVAE:
    """A WanVAE with seeded random weights on `device`, all in `dtype` (float32 as released)."""
    with torch.device("meta"):
        model = WanVAE(config).to(dtype)
    return materialize_random(model, device, seed)
