"""The hypernetwork itself: its config, the target layers it writes, the resamplers and the basis banks.

Data flows one way through this package: features -> resamplers -> coefficients -> `BasisBank.mix` -> LoRA factors.
`HyperLoRAPredictor` (predictor.py) owns the weights; nothing here knows about pipelines, PEFT or files.
"""
