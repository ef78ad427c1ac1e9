"""The networks (Wav2Lip generator, expert SyncNet, quality discriminator, the original syncnet_v2), the
checkpoint format, and the frame conversions the networks need. Generation and scoring load a model from
here without importing training. Importing the package does not import torch (models.frames is numpy)."""
