"""Fine-tune four adapters of four kinds (LoRA, prefix tuning, prompt tuning, P-tuning) in one
training loop, every batch mixing their rows. The loop itself is ``peft_kernels.mixed_training.train``
(read it: it is a plain PyTorch loop over ``MultiAdapterModel``).

    python examples/train_mixed_adapters.py [--steps 60] [--device cpu]
"""
import argparse

import torch

from peft_kernels.mixed_training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    history = train(args.steps, args.device)
    print(f"\n{'adapter':<10} {'first loss':>10} {'last loss':>10}")
    for name, losses in history.items():
        print(f"{name:<10} {losses[0]:>10.3f} {sum(losses[-5:]) / 5:>10.3f}")


if __name__ == "__main__":
    main()
