"""The diffusers side: the methods installed on SD, SDXL, SD3 and FLUX pipelines (mixin.py), the controller that
owns HyperLoRA on one pipeline (`pipe.hyperlora`, controller.py), its device/offload policy (placement.py) and the
import hook that installs the methods (install.py).

Nothing heavy is imported here: `import diffusers_hyperlora` loads only install.py.
"""
