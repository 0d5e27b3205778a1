"""autosplit: split diffusion fine-tuning into a cached preprocessing stage and a training stage."""

__version__ = "0.1.0"
