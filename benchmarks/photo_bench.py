"""Photo -> weights ready, broken down (section 3 of `benchmarks/run.py`).

On CPU the face models are the tiny AntelopeV2-shaped ONNX stand-ins of `tests/face_models.py` (a colour-keyed
detector, template landmarks, a small recognition net) and CLIP is a full-size ViT-L/14 vision tower with random
weights (CLIP is what costs time; the tiny CLIP of the tests would hide it). The resampler, mixing and write are
the full-size SDXL HyperLoRA's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch


def _median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_photo_to_weights(pipe_factory, device: torch.device, args, predictor_factory) -> Iterator:
    """Yield `Row`s: face analysis + crops, ArcFace embedding normalisation, CLIP, resampler, mixing, write.

    The tiny face models live in a temporary folder, removed when the rows are done (the sessions read it lazily)."""
    with tempfile.TemporaryDirectory(prefix="hyperlora-bench-faces-") as temporary:
        yield from _measure_photo_to_weights(pipe_factory, device, args, predictor_factory, temporary)


def _measure_photo_to_weights(pipe_factory, device: torch.device, args, predictor_factory, temporary: str) -> Iterator:
    from face_models import draw_face_marker, export_tiny_antelopev2  # tests/face_models.py
    from run import Row, ms  # benchmarks/run.py
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffusers_hyperlora.face import CLIPImageEncoder, FaceAnalyzer, FaceFeatureExtractor, default_clip_processor

    repeats = max(1, min(args.repeats, 3))
    pipe = pipe_factory()
    predictor = predictor_factory()
    folder = export_tiny_antelopev2(temporary)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    analyzer = FaceAnalyzer.from_pretrained(folder, providers=providers)
    torch.manual_seed(0)
    width, tiny = predictor.config.image_embed_dim, getattr(args, "dry_run", False)  # 1024 for the release
    clip_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2 if tiny else 24,
        num_attention_heads=4 if tiny else 16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    encoder = CLIPImageEncoder(CLIPVisionModelWithProjection(clip_config).to(device), default_clip_processor(224))
    extractor = FaceFeatureExtractor(predictor.config, encoder, analyzer)
    rng = np.random.default_rng(0)
    photo = draw_face_marker(rng.integers(0, 200, size=(768, 768, 3), dtype=np.uint8), (300, 220, 460, 420))

    face_time = _median_time(lambda: extractor.prepare_inputs([photo], with_base=False), repeats, device)
    prepared = extractor.prepare_inputs([photo], with_base=False)
    # Encoders and resampler run in float16 on a GPU and in float32 on a CPU (no fast fp16 CPU matmuls); the
    # bank keeps the dtype it was built in and is mixed with float32 accumulation either way.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    clip_time = _median_time(lambda: encoder.hidden_states([prepared[0].clip_image], device, dtype), repeats, device)
    features = extractor([photo], device=device, dtype=dtype, with_base=False)
    for module in (predictor.resampler, predictor.id_projector):
        if module is not None:
            module.to(device=device, dtype=dtype)
    resampler_time = _median_time(
        lambda: predictor.predict(id_embeds=features.id_embeds, clip_hidden_states=features.clip_hidden_states),
        repeats,
        device,
    )
    identity = predictor.predict(id_embeds=features.id_embeds, clip_hidden_states=features.clip_hidden_states)
    pipe.load_hyperlora(predictor)
    bank = predictor.id_bank
    coefficients = predictor.split_coefficients(identity.id_coefficients.to(device))
    mix_time = _median_time(lambda: bank.mix(coefficients), repeats, device)
    mixed = bank.mix(coefficients)
    adapters = pipe.hyperlora.adapters
    write_time = _median_time(lambda: adapters.write_mixed("id", bank.groups, mixed), repeats, device)
    total = face_time + clip_time + resampler_time + mix_time + write_time
    stand_in = "tiny ONNX stand-ins" if device.type != "cuda" else "tiny ONNX stand-ins (real AntelopeV2 not bundled)"
    parts = [
        (f"face analysis: detector + 106 landmarks + ArcFace re-detection/embedding + crops ({stand_in})", face_time),
        (f"CLIP ViT-L/14 vision tower (full size, random weights, {dtype}), 1 crop".replace("torch.", ""), clip_time),
        (f"resampler (full size, {dtype}) + averaging".replace("torch.", ""), resampler_time),
        (f"bank mixing ({bank.down[0].dtype} bank)".replace("torch.", ""), mix_time),
        ("write into the live adapters", write_time),
    ]
    for what, seconds in parts:
        part = {"kind": "photo_part", "ms": 1e3 * seconds}
        yield Row("3 photo -> weights", what, ms(seconds), "", f"{100 * seconds / total:.0f} % of total", data=part)
    summed = {"kind": "photo_total", "ms": 1e3 * total}
    yield Row("3 photo -> weights", "total, 1 photo (sum of the parts)", ms(total), data=summed)
    pipe.unload_hyperlora()
