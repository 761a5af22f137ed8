"""mic_uda: unsupervised domain adaptation (DACS, MIC, ...) with Lightning and Hydra."""

__version__ = "0.1.0"
