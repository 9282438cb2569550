"""Training: the LightningModule, the identity-pair DataModule, callbacks and the LightningCLI.

Kept apart from the model code in :mod:`bolid` (which never imports lightning), so that a user who only
generates images never imports the trainer.
"""
