"""Train the toy world's judges on every shape x look (held-outs included: judges are not the model judged).

* CLIP slot: an open_clip ``CLIP`` (configs.CLIP: ViT 32x32 / patch 4, 3 layers; word-level text tower)
  trained contrastively on images and captions "a mushroom in zzt style"; images sharing a caption count as
  matches.
* DINO slot: a timm ViT (configs.DINO_OPTIONS) trained to classify both the shape and the look of an image
  (two linear heads on the CLS token), the heads dropped on saving: the CLS token is the embedding, as with
  DINO, and it carries both what is drawn and how.

Both are saved as safetensors that ``fusion_engine.scoring.encoders.load_openclip`` / ``load_dino`` read.

    python -m training.toy.train_judges --out toy_weights [--steps 600] [--world v1|v2]

``--world v2``: the second world's 11 shapes x 10 looks (``worlds/toy/v2.py``), same architectures; the
subject's own look on the varied grounds of its DreamBooth images (``v2.subject_ground``, from run 3), so a
judge's subject embedding is not its ground's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusion_engine.worlds.toy import configs
from fusion_engine.worlds.toy.data import LOOKS, SHAPES, SUBJECT_LOOK, caption, render
from fusion_engine.worlds.toy.world import CLIP_FILE, DINO_FILE

from .common import DEFAULT_OUT, log

WORDS = ("a", "an", "image", "in", "style", *SHAPES, *LOOKS)
PAD, SOT, EOT = 0, 1, configs.CLIP["text_cfg"]["vocab_size"] - 1  # EOT highest: open_clip pools at argmax
OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def world_tables(world: str) -> tuple[tuple, tuple, tuple, object]:
    """(words, shapes, looks, own_ground) of ``world``: what the judges' text tower and classifier heads cover,
    and how the subject's own look draws its ground (None: the first world's black; else ``rng -> RGB``)."""
    if world == "v1":
        return WORDS, SHAPES, LOOKS, None
    from fusion_engine.worlds.toy import v2

    return ("a", "an", "image", "in", "style", *v2.SHAPES, *v2.LOOKS), v2.SHAPES, v2.LOOKS, v2.subject_ground


def tokenize(text: str, words=WORDS) -> torch.Tensor:
    ids = [SOT] + [2 + words.index(word) for word in text.split()] + [EOT]
    length = configs.CLIP["text_cfg"]["context_length"]
    return torch.tensor(ids + [PAD] * (length - len(ids)))


def batch(rng: np.random.Generator, size: int, shape_names=SHAPES, look_names=LOOKS, own_ground=None):
    shapes = rng.integers(len(shape_names), size=size)
    looks = rng.integers(len(look_names), size=size)
    images = [render(shape_names[a], look_names[b], rng,
                     ground=own_ground(rng) if own_ground and look_names[b] == SUBJECT_LOOK else None)
              for a, b in zip(shapes, looks)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.from_numpy(shapes), torch.from_numpy(looks)


def train_clip(steps: int, seed: int, size: int = 128, world: str = "v1"):
    import open_clip

    words, shape_names, look_names, own_ground = world_tables(world)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = open_clip.CLIP(**configs.CLIP)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start = time.perf_counter()
    for step in range(steps):
        pixels, shapes, looks = batch(rng, size, shape_names, look_names, own_ground)
        key = shapes * len(look_names) + looks
        texts = torch.stack([tokenize(caption(shape_names[a], look_names[b]), words) for a, b in zip(shapes, looks)])
        image_features, text_features, scale = model((pixels - OPENAI_MEAN) / OPENAI_STD, texts)
        logits = scale * image_features @ text_features.T
        target = (key[:, None] == key[None, :]).float()
        target = target / target.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), time.perf_counter() - start


def train_dino(steps: int, seed: int, size: int = 128, world: str = "v1"):
    import timm

    _, shape_names, look_names, own_ground = world_tables(world)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = timm.create_model(configs.DINO_NAME, pretrained=False, num_classes=len(shape_names) + len(look_names),
                              **configs.DINO_OPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start = time.perf_counter()
    for step in range(steps):
        pixels, shapes, looks = batch(rng, size, shape_names, look_names, own_ground)
        logits = model((pixels - IMAGENET_MEAN) / IMAGENET_STD)
        shape_logits, look_logits = logits[:, :len(shape_names)], logits[:, len(shape_names):]
        loss = F.cross_entropy(shape_logits, shapes) + F.cross_entropy(look_logits, looks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            shape_acc = (shape_logits.argmax(1) == shapes).float().mean().item()
            look_acc = (look_logits.argmax(1) == looks).float().mean().item()
            log(f"dino step {step} loss {loss.item():.4f} shape acc {shape_acc:.2f} look acc {look_acc:.2f} "
                f"({time.perf_counter() - start:.0f} s)")
    return model.eval(), time.perf_counter() - start


def main(argv=None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--world", choices=["v1", "v2"], default="v1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip, clip_s = train_clip(args.steps, args.seed + 100, world=args.world)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / CLIP_FILE))
    log(f"clip judge: {args.steps} steps, {clip_s:.0f} s")
    dino, dino_s = train_dino(args.steps, args.seed + 200, world=args.world)
    state = {k: v.contiguous() for k, v in dino.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(out / DINO_FILE))
    log(f"dino judge: {args.steps} steps, {dino_s:.0f} s")
    (out / "times_judges.json").write_text(json.dumps({"clip_s": round(clip_s), "dino_s": round(dino_s),
                                                       "steps": args.steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
