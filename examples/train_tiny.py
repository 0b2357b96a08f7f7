"""Train a tiny HyperLoRA with the paper's three-stage curriculum, fully offline, in about a minute on a CPU.

The SDXL pipeline, the predictor (with a Base branch) and the dataset (synthetic "people" with consistent face
features) are all built in code with random weights; the point is to run every real step of training: frozen
encoders, predicted LoRA applied differentiably, accelerate loop, checkpoints, `save_pretrained` per stage.

    python examples/train_tiny.py --steps 20                # writes to outputs/train_tiny (ignored by git)
    python examples/train_tiny.py --prediction-type sample   # the loss falls fastest on this tiny task
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_tiny.py --batch-size 1

`--batch-size` is the batch of each process: 2 processes x batch 1 train the same predictor as 1 process x
batch 2 (same seed). Every process prints a digest of its predictor at the end: they are equal. (On a CPU-only
machine, `accelerate launch --cpu --num_processes 2` starts a single process unless given an MPI hostfile; the
line above starts two through torchrun with the gloo backend. On GPUs: `accelerate launch --multi_gpu ...`.)

Then load the final predictor like any checkpoint: `pipe.load_hyperlora("outputs/train_tiny/id_full/predictor")`.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import EulerDiscreteScheduler

import diffusers_hyperlora  # noqa: F401  (adds pipe.load_hyperlora & co.)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline
from diffusers_hyperlora.training import TrainingConfig, default_curriculum, tiny_training_dataset, train_curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/train_tiny"),
        help="where the stages' predictors, checkpoints and losses go (default: %(default)s, ignored by git)",
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step and process")
    parser.add_argument("--stages", nargs="+", choices=["base", "id_clip", "id_full"], default=None)
    parser.add_argument("--cache", action="store_true", help="cache VAE latents (prompt embeddings are cached anyway)")
    parser.add_argument("--caption-dropout", type=float, default=0.0)
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
    stages = default_curriculum(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        save_every=args.steps,
        show_progress=False,
        cache_latents=args.cache,
        caption_dropout=args.caption_dropout,
    )
    if args.stages:
        stages = [stage for stage in stages if stage.stage in args.stages]
    config = TrainingConfig(str(args.output_dir), stages=stages)
    losses: dict[str, list[float]] = defaultdict(list)

    def report(log) -> None:
        losses[log.stage].append(log.loss)
        if PartialState().is_main_process:  # the state train_stage's Accelerator set up
            print(f"stage {log.stage:8s} step {log.step:4d}  loss {log.loss:.5f}  lr {log.learning_rate:.2e}")

    predictor = train_curriculum(pipe, predictor, dataset, config, callback=report)
    process = PartialState()
    digest = hashlib.sha256()
    for name, value in sorted(predictor.state_dict().items()):
        digest.update(name.encode() + value.cpu().numpy().tobytes())
    print(f"process {process.process_index}/{process.num_processes}: predictor sha256 {digest.hexdigest()}")
    if not process.is_main_process:
        return

    print("\nloss per stage (mean of the first / last quarter of the steps):")
    for stage, values in losses.items():
        quarter = max(1, len(values) // 4)
        first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
        print(f"  {stage:8s} {first:.5f} -> {last:.5f}   saved to {args.output_dir / stage / 'predictor'}")
    print(f"\nEverything this run wrote is under {args.output_dir.resolve()} (delete the folder when done).")


if __name__ == "__main__":
    main()
