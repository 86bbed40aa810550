"""jointdlm: fast and faithful parallel sampling from masked diffusion language models."""

__version__ = "0.1.0"
