"""Latent space: autoencoders (a local diffusers AutoencoderKL, or identity = pixel space) and the latent cache.

    from efdit.latent import load_autoencoder, cache_latents, LatentDataset
    vae = load_autoencoder("pretrained/sd-vae-ft-mse")      # a local folder: config.json + weights, never downloaded
    cache_latents(dataset, vae, "cache/inat21-256")         # sharded safetensors: posterior mean + std per image
    ds = LatentDataset("cache/inat21-256")                  # training draws mean + std * noise every step

Nothing heavy is imported here: diffusers is imported only when a VAE is loaded.
"""
from efdit.latent.autoencoder import Autoencoder, DiffusersVAE, IdentityAutoencoder, load_autoencoder
from efdit.latent.cache import LatentDataset, cache_latents

__all__ = ["Autoencoder", "DiffusersVAE", "IdentityAutoencoder", "load_autoencoder", "LatentDataset",
           "cache_latents"]
