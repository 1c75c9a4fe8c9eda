"""The eager VAE backend: ``memrope.vae.WanStreamingDecoder`` called directly in PyTorch.

Owns: binding the decoder module to a run's latent grid (its ``vae_decode`` contract) and
copying the module's fresh outputs into the caller's fixed buffers. The reference the exported
backends are compared with at run time; the module itself is checked against diffusers' decode.
"""

from __future__ import annotations

import torch

from memrope.backend import VAEBackend
from memrope.config import RunConfig
from memrope.contract import DTYPE_NAMES, vae_decode_contract
from memrope.vae import WanStreamingDecoder


class EagerVAEBackend(VAEBackend):
    """The decoder module in this process, on its parameters' device and dtype.

    Args:
        module: the decoder, with weights loaded (``WanStreamingDecoder.from_diffusers``).
        run: the run whose latent grid and batch the decode steps have.
    """

    name = "eager"

    def __init__(self, module: WanStreamingDecoder, run: RunConfig):
        param = module.post_quant_conv.weight
        self.module = module.eval()
        self.config = module.config
        self.device, self.dtype = param.device, param.dtype
        self.contract = vae_decode_contract(module.config, run, DTYPE_NAMES[param.dtype], run.batch_size)
        if module.latent_frames != self.contract.input("latents").shape[1]:
            raise ValueError(f"the module decodes {module.latent_frames} latent frames per step; the "
                             f"contract's step is {self.contract.input('latents').shape[1]}")
        self._inputs = self.contract.input_names
        self._outputs = self.contract.output_names

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        results = self.module(*(feeds[name] for name in self._inputs))
        for name, tensor in zip(self._outputs, results, strict=True):
            outputs[name].copy_(tensor)
