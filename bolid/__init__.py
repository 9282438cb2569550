"""BoLID: Body-Lightning ID Diffusion.

Identity-preserving SDXL / SDXL-Lightning generation that keeps a person's body
(proportions, build), not only the face. Model code lives here as plain ``nn.Module``s;
training wraps it elsewhere, so generating images never imports the trainer.
"""

__version__ = "0.1.0"
