"""Exceptions users can catch. Each is also a builtin (`ValueError`, `RuntimeError`, ...) so generic handlers work."""


class HyperLoRAError(Exception):
    """Base class of every error raised on purpose by diffusers-hyperlora.

    Attributes:
        argument: the name of the parameter (or file field) the error is about, as the called function spells it
            (`"weights"`, `"guidance_scale"`), or `None`. Front ends use it to name their own spelling of that input
            (the command line's `--weights`) without parsing the message.

    Example:
        >>> error = InvalidArgumentError("`weights` must be finite, got [inf, 1.0]", argument="weights")
        >>> error.argument, isinstance(error, ValueError)
        ('weights', True)
    """

    def __init__(self, *args: object, argument: str | None = None) -> None:
        super().__init__(*args)
        self.argument = argument


class HyperLoRANotLoadedError(HyperLoRAError, RuntimeError):
    """An identity method was called on a pipeline before `load_hyperlora`."""


class TargetMismatchError(HyperLoRAError, ValueError):
    """The denoiser lacks a layer the checkpoint targets, or the layer has other widths."""


class AdapterNameConflictError(HyperLoRAError, ValueError):
    """An adapter with the name HyperLoRA wants already exists on the denoiser."""


class FeatureShapeError(HyperLoRAError, ValueError):
    """Image features (ArcFace embeddings, CLIP hidden states) do not have the shape the checkpoint expects."""


class IdentityMismatchError(HyperLoRAError, ValueError):
    """An identity predicted by one checkpoint was used with another."""


class CheckpointFormatError(HyperLoRAError, ValueError):
    """A folder or repo is not a HyperLoRA checkpoint, misses files, or holds unsafe (pickle) weights."""


class CheckpointNotFoundError(HyperLoRAError, FileNotFoundError):
    """A checkpoint file could not be found locally, in the cache or on the Hub."""


class NoFaceDetectedError(HyperLoRAError, ValueError):
    """None of the input images contains a detectable face."""


class IdentityFormatError(HyperLoRAError, ValueError):
    """A file is not a saved `HyperLoRAIdentity` (wrong kind of file, damaged, or from a newer version)."""


class IdentityNotFoundError(HyperLoRAError, FileNotFoundError):
    """No identity file at the path given (`HyperLoRAIdentity.load`, identity files among CLI inputs)."""


class ImageInputError(HyperLoRAError, ValueError):
    """An input image cannot be read, or has a form (type, shape, dtype, value range) that is not supported."""


class FaceModelsNotFoundError(HyperLoRAError, FileNotFoundError):
    """The face-analysis models (AntelopeV2 ONNX files) or the CLIP image encoder could not be found or loaded."""


class FaceSelectionError(HyperLoRAError, ValueError):
    """`face_index` asks for a face that an image does not have."""


class TrainingConfigError(HyperLoRAError, ValueError):
    """A training configuration is invalid, or does not fit the predictor (e.g. stage `base` without a Base branch)."""


class TrainingDataError(HyperLoRAError, ValueError):
    """A training dataset is malformed: bad `metadata.jsonl`, missing images, or missing / mismatched features."""


class HyperLoRAWriteError(HyperLoRAError, OSError):
    """A file could not be written (missing permission, full disk, ...). The destination was left unchanged."""


class IdentityCountError(HyperLoRAError, ValueError):
    """Per-sample identities: the batch does not have one identity per prompt."""


class PerSampleFusedError(HyperLoRAError, RuntimeError):
    """Per-sample identities were asked for while HyperLoRA's adapters are fused (or fused while in use)."""


class NonFiniteValueError(HyperLoRAError, ValueError):
    """A tensor holds NaN or infinite values (features, an identity, checkpoint weights, face-analyzer output)."""


class InvalidArgumentError(HyperLoRAError, ValueError):
    """An argument has a value the call cannot use (an empty list, an unknown name or format, bad weights)."""


class InvalidArgumentTypeError(HyperLoRAError, TypeError):
    """An argument has a type the call cannot use."""


class MissingDependencyError(HyperLoRAError, ImportError):
    """An optional dependency a feature needs is not installed (e.g. insightface for reading faces from photos);
    the message names the extra to install (`pip install 'diffusers-hyperlora[face]'`; from a clone:
    `pip install -e '.[face]'`)."""


class UnsupportedPipelineError(HyperLoRAError, ValueError):
    """The pipeline is of a kind HyperLoRA does not support (a denoiser no target layout knows, group offloading)."""
