"""The PEFT side: the `"id"`/`"base"` adapters on the denoiser, exact merging for fused mode, the hook that keeps
them out of `save_pretrained`, identity writes (one identity or one per sample) and sliders."""
