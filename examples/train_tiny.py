"""Train a tiny HyperLoRA with the paper's three-stage curriculum, fully offline, in about a minute on a CPU.

The SDXL pipeline, the predictor (with a Base branch) and the dataset (synthetic "people" with consistent face
features) are all built in code with random weights; the point is to run every real step of training: frozen
encoders, predicted LoRA applied differentiably, accelerate loop, checkpoints, `save_pretrained` per stage.

    python examples/train_tiny.py --output-dir runs/tiny --steps 20
    python examples/train_tiny.py --prediction-type sample   # the loss falls fastest on this tiny task

Then load the final predictor like any checkpoint: `pipe.load_hyperlora("runs/tiny/id_full/predictor")`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler

import diffusers_hyperlora  # noqa: F401  (adds pipe.load_hyperlora & co.)
from diffusers_hyperlora.tiny import tiny_hyperlora_predictor, tiny_sdxl_pipeline
from diffusers_hyperlora.training import TrainingConfig, default_curriculum, tiny_training_dataset, train_curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--people", type=int, default=2)
    parser.add_argument("--images-per-person", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample"],
        default="epsilon",
        help="what the UNet is trained to predict (SDXL: epsilon; 'sample' shows the tiny overfit most clearly)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = tiny_sdxl_pipeline(seed=args.seed)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=args.prediction_type)
    predictor = tiny_hyperlora_predictor(pipe.unet, seed=args.seed, base_rank=4)
    dataset = tiny_training_dataset(num_people=args.people, images_per_person=args.images_per_person, seed=args.seed)
    config = TrainingConfig(
        str(args.output_dir),
        stages=default_curriculum(
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            save_every=args.steps,
            show_progress=False,
        ),
    )
    losses: dict[str, list[float]] = defaultdict(list)

    def report(log) -> None:
        losses[log.stage].append(log.loss)
        print(f"stage {log.stage:8s} step {log.step:4d}  loss {log.loss:.5f}  lr {log.learning_rate:.2e}")

    train_curriculum(pipe, predictor, dataset, config, callback=report)

    print("\nloss per stage (mean of the first / last quarter of the steps):")
    for stage, values in losses.items():
        quarter = max(1, len(values) // 4)
        first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
        print(f"  {stage:8s} {first:.5f} -> {last:.5f}   saved to {args.output_dir / stage / 'predictor'}")


if __name__ == "__main__":
    main()
