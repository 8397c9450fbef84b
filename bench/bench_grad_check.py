"""bf16 against fp32: the gradient of tifactory's own training loss on the trainable vectors (issue 12).

Builds a random-weight full-size SD1.5 (UNet 860M, CLIP-L text encoder, VAE) on the GPU once, then for
each seed runs the real `tifactory.training.train.train_embedding` for one optimizer step (15 samples, the recipe's
defaults, eager) in each precision, on identical copies of the model, and records the gradient that reaches
the optimizer (a step pre-hook on the AdamW that `make_optimizer` returns: the exact tensor tifactory's loss
and backward produce). Same seed = same latents, noise, timesteps and prompts in every precision.

    python bench/bench_grad_check.py --device cuda --seeds 1,2,3,4 --json-out grad.json
    python bench/bench_grad_check.py --tiny --device cpu --seeds 1 --precisions no,no   # CPU smoke test

Precisions: `bf16` (bf16 weights, no autocast: the default), `bf16-autocast` (bf16 weights under
torch.autocast), `no` (fp32, TF32 off: the reference). Prints, per seed and precision, the cosine between
that precision's gradient and the fp32 one, and the relative error ||g - g32|| / ||g32||.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def one_step_gradient(components, precision: str, seed: int, args, workdir: Path):
    import torch
    import yaml

    import tifactory.training.train as train
    from tifactory.families import ModelSpec
    from tifactory.training.settings import TrainSettings

    with open(REPO / "config.yaml", encoding="utf-8") as handle:
        params = dict(yaml.safe_load(handle)["train"])
    params.update(init_word="woman", max_train_steps=1, save_every_n_steps=1, compile=False, device=args.device,
                  resolution=args.resolution, seed=seed, mixed_precision=precision.split("-")[0],
                  autocast=precision.endswith("-autocast"))
    grads = []
    original = train.make_optimizer

    def recording_optimizer(params_, trainable):
        optimizer = original(params_, trainable)
        optimizer.register_step_pre_hook(
            lambda opt, *_: grads.append(opt.param_groups[0]["params"][0].grad.detach().float().clone()))
        return optimizer

    train.make_optimizer = recording_optimizer
    try:
        run_dir = Path(tempfile.mkdtemp(dir=workdir))
        train.train_embedding(dataset_toml=args.toml, model=ModelSpec(path="random-sd15", family="sd15"),
                              subject="gradcheck", settings=TrainSettings.from_config(params),
                              final_path=run_dir / "out.safetensors", checkpoint_dir=run_dir / "ckpt",
                              loss_tsv=run_dir / "loss.tsv", state_dir=run_dir / "state",
                              log=lambda message: print(f"  [{precision} seed {seed}] {message}", file=sys.stderr),
                              components=components)
    finally:
        train.make_optimizer = original
    if len(grads) != 1:
        raise SystemExit(f"expected one optimizer step, saw {len(grads)}")
    return grads[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--precisions", default="no,bf16,bf16-autocast", help="the first is the reference")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()

    import torch

    from bench_train import build_random_sd15, make_dataset

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is plain fp32
    torch.backends.cudnn.allow_tf32 = False
    workdir = Path(tempfile.mkdtemp(prefix="tifactory-gradcheck-"))
    args.toml = make_dataset(workdir / "dataset", args.images, args.resolution)
    pristine = build_random_sd15(args.device, args.tiny, workdir)  # fp32 weights; each run casts a copy
    precisions = args.precisions.split(",")
    rows = []
    for seed in (int(value) for value in args.seeds.split(",")):
        reference = None
        for precision in precisions:
            gradient = one_step_gradient(copy.deepcopy(pristine), precision, seed, args, workdir)
            if reference is None:
                reference = gradient
                continue
            cosine = torch.nn.functional.cosine_similarity(gradient.flatten(), reference.flatten(), dim=0).item()
            relative = ((gradient - reference).norm() / reference.norm()).item()
            per_vector = torch.nn.functional.cosine_similarity(gradient, reference, dim=1).tolist()
            row = {"seed": seed, "precision": precision, "reference": precisions[0], "cosine": cosine,
                   "relative_error": relative, "per_vector_cosine": per_vector,
                   "grad_norm": gradient.norm().item(), "reference_grad_norm": reference.norm().item()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'seed':>5} {'precision':<16}{'cosine':>10}{'rel. error':>12}{'min vector cos':>16}")
    for row in rows:
        print(f"{row['seed']:>5} {row['precision']:<16}{row['cosine']:>10.5f}{row['relative_error']:>12.4f}"
              f"{min(row['per_vector_cosine']):>16.5f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": args.device, "gpu": torch.cuda.get_device_name()
                                                   if args.device.startswith("cuda") else "", "rows": rows},
                                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
