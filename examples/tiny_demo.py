"""The main job on a built-in tiny default, fully offline: SDXL pipeline + HyperLoRA -> identity -> image.

Everything is built in code with random weights (a tiny SDXL pipeline and a tiny HyperLoRA whose
architecture is the `official-tiny` fixture's), so the image is noise-like: the point is to run every real
step of the library end to end and show what each costs. With real weights, replace the two builders by
`StableDiffusionXLPipeline.from_pretrained(...)` and `pipe.load_hyperlora("org/hyperlora")`.

    python examples/tiny_demo.py --output-dir outputs
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import diffusers_hyperlora  # noqa: F401  (adds pipe.load_hyperlora & co.)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

TIMINGS: list[tuple[str, float, str]] = []


@contextmanager
def step(name: str, detail: str = ""):
    start = time.perf_counter()
    yield
    TIMINGS.append((name, time.perf_counter() - start, detail))


def fake_face_features(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for what the face pipeline computes from photos: normed ArcFace embeddings + CLIP states."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(num_images, 512, generator=g), dim=-1)
    return embeds, torch.randn(num_images, 17, 48, generator=g)


def generate(pipe, prompt: str, args: argparse.Namespace):
    """One image, the same seed every time, so that images differ only by the adapters' contents."""
    generator = torch.Generator().manual_seed(args.seed)
    return pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    prompt = "fcsks fxhks fhyks, a photo of a person as an astronaut"

    with step("build tiny SDXL pipeline", "UNet 2 levels, 24 attention modules"):
        pipe = tiny_sdxl_pipeline(seed=args.seed)
        pipe.set_progress_bar_config(disable=True)
    with step("save a tiny HyperLoRA", "library format: config.json + model.safetensors"):
        checkpoint = args.output_dir / "tiny-hyperlora"
        tiny_hyperlora_predictor(pipe.unet, seed=args.seed).save_pretrained(checkpoint)
    with step("pipe.load_hyperlora", "reads the folder, adds PEFT adapters 'id' and 'base'"):
        pipe.load_hyperlora(checkpoint)
    with step("plain image (adapters at 0)"):
        pipe.set_adapters(["id", "base"], [0.0, 0.0])
        plain = generate(pipe, prompt, args)
    with step("predict identity", "2 photos' features -> coefficients (mean, then normalize)"):
        embeds, clip = fake_face_features(2, args.seed + 1)
        identity = pipe.hyperlora.predict(id_embeds=embeds, clip_hidden_states=clip, sources=["a.jpg", "b.jpg"])
    with step("pipe.set_hyperlora_identity", "bank mix + in-place write into 96 LoRA'd linears"):
        pipe.set_hyperlora_identity(identity)
        pipe.set_adapters(["id", "base"], [0.8, 0.0])
    with step("personalized image", f"{args.steps} steps, {args.size}x{args.size}"):
        image = generate(pipe, prompt, args)
    with step("another person's image", "a second identity, same prompt and seed"):
        embeds, clip = fake_face_features(2, args.seed + 2)
        other = pipe.hyperlora.predict(id_embeds=embeds, clip_hidden_states=clip, sources=["c.jpg", "d.jpg"])
        pipe.set_hyperlora_identity(other)
        other_image = generate(pipe, prompt, args)
    with step("export kohya LoRA", "standard LoRA file for ComfyUI / A1111 / diffusers"):
        lora_path = args.output_dir / "tiny_identity_lora.safetensors"
        state = pipe.hyperlora.export_lora(identity, path=lora_path, format="kohya")

    image_path = args.output_dir / "tiny_demo.png"
    image.images[0].save(image_path)
    plain.images[0].save(args.output_dir / "tiny_demo_plain.png")
    other_image.images[0].save(args.output_dir / "tiny_demo_other.png")

    print(f"prompt: {prompt!r}")
    print(f"identity: {identity.num_images} images, {tuple(identity.id_coefficients.shape)} coefficients")
    print(f"image: {image_path} (also tiny_demo_plain.png: adapters off; tiny_demo_other.png: another identity)")
    print(f"  the identity vs. adapters off:  {difference(image, plain)}")
    print(f"  the identity vs. another one:   {difference(image, other_image)}")
    print(
        "  (the tiny HyperLoRA has random weights, so its LoRA is a small random update and the images differ by a\n"
        "  few levels; that they differ, and differ per person, is the point: with the release it changes the face)"
    )
    print(f"LoRA: {lora_path} ({len(state)} tensors)")
    print()
    total = sum(seconds for _, seconds, _ in TIMINGS)
    print(f"One un-warmed run on this machine ({total:.1f} s in all): first calls include one-time costs, and on a")
    print("busy machine the seconds vary from run to run; the shares of the total are the steadier figure.")
    print()
    print(f"| {'step':<32} | {'seconds':>8} | {'share':>6} | what |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 8}|------|")
    for name, seconds, detail in TIMINGS:
        print(f"| {name:<32} | {seconds:8.3f} | {seconds / total:6.1%} | {detail} |")


def difference(first, second) -> str:
    """How two generated images differ, in 8-bit levels: mean and max |difference|, share of pixels changed."""
    a = np.asarray(first.images[0], "float32")
    b = np.asarray(second.images[0], "float32")
    delta = np.abs(a - b)
    changed = (delta.max(axis=-1) >= 1).mean()
    return f"mean |difference| {delta.mean():.2f} / 255, max {delta.max():.0f} / 255, {changed:.0%} of pixels changed"


if __name__ == "__main__":
    main()
