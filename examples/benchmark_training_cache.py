"""Steps per second of the tiny training run with and without caching VAE latents and prompt embeddings.

    python examples/benchmark_training_cache.py                  # tiny defaults: 32 px, 20 steps, 3 rounds
    python examples/benchmark_training_cache.py --resolution 64 --steps 30

Both variants train the same stage (`id_clip`) on the same data with the same seed (they end with bitwise equal
predictors, see tests/test_training.py); they run interleaved, `--rounds` times each, and the best round counts.
"steps/s" is measured from the first to the last optimizer step (the one-off caching pass excluded); "wall" is the
whole `train_stage` call, caching pass included. The ratio is cached / uncached.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline
from diffusers_hyperlora.training import StageConfig, tiny_training_dataset, train_stage


def one_run(cache: bool, args: argparse.Namespace) -> tuple[float, float]:
    """`(steps/s over the steps after the first, wall seconds)` of one training stage."""
    pipe = tiny_sdxl_pipeline(seed=0)
    predictor = tiny_hyperlora_predictor(pipe.unet, seed=0)
    dataset = tiny_training_dataset(num_people=4, images_per_person=2, resolution=args.resolution, with_base=False)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        config = StageConfig(
            "id_clip",
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=1e-3,
            cache_latents=cache,
            cache_prompt_embeds=cache,
            show_progress=False,
            output_dir=folder,
        )
        start = time.perf_counter()
        train_stage(pipe, predictor, dataset, config, callback=lambda log: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - start
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    best = {False: (0.0, float("inf")), True: (0.0, float("inf"))}
    for _ in range(args.rounds):
        for cache in (False, True):
            rate, wall = one_run(cache, args)
            best[cache] = (max(best[cache][0], rate), min(best[cache][1], wall))
    print(f"tiny run: {args.steps} steps, batch {args.batch_size}, {args.resolution} px, best of {args.rounds}")
    for cache, label in ((False, "encode every step"), (True, "cached latents + prompts")):
        print(f"  {label:26s} {best[cache][0]:7.2f} steps/s   wall {best[cache][1]:6.2f} s")
    print(
        f"  ratio cached / uncached: {best[True][0] / best[False][0]:.2f}x steps/s, "
        f"{best[False][1] / best[True][1]:.2f}x wall"
    )


if __name__ == "__main__":
    main()
