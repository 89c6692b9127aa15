"""How one task is learned (SPEC section 1), for train.py and the notebook alike: CLIP's contrastive
loss of its images against its class prompts, each optimizer step followed by the proximal step."""
import contextlib
import itertools
import math

import torch
import torch.nn.functional as F

import clip_model
import codyra


def contrastive_loss(img, txt, labels, scale, earlier=None):
    """The released code's training loss, ce_i + ce_t. img (B, E), txt (C, E): normalised features
    of a batch and of the current task's class prompts; labels (B,) in 0..C-1. ce_i: each image vs
    the current classes. ce_t: each class prompt, the earlier tasks' (P, E) first, vs the images,
    its images the targets (unnormalised); a class absent from the batch counts in the mean too."""
    earlier = txt[:0] if earlier is None else earlier                    # (P, E)
    ce_i = F.cross_entropy(scale * img @ txt.T, labels)                 # image -> current classes
    classes = torch.cat([earlier, txt])                                 # (P + C, E)
    targets = F.one_hot(labels + len(earlier), len(classes)).T.float()  # (P + C, B)
    return ce_i + F.cross_entropy(scale * classes @ img.T, targets)     # + class -> its images


def steps(model, task, train_set, args, t=0, earlier=None, device=torch.device("cpu"),
          autocast=contextlib.nullcontext()):
    """Train what requires grad in `model` (fresh adapters, or every weight) on `task`, yielding
    (step, loss, tau) after each step. args: train.py's flags method, lr, weight_decay, seed,
    iterations, batch_size, dense_ratio, kappa_max, workers; t, the task's place in the sequence,
    seeds the order of the images; earlier (P, E): the earlier classes' prompts (no gradient)."""
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                                  betas=(0.9, 0.9999), eps=1e-8, weight_decay=args.weight_decay)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / args.iterations)))
    # the current classes' prompts go through the text encoder WITH gradients: its adapters learn
    tokens = clip_model.tokenize([task.templates[0].format(c) for c in task.classnames]).to(device)
    shuffle = torch.Generator().manual_seed(args.seed + 1000 * t)  # the order: (seed, task) alone
    stream = itertools.chain.from_iterable(itertools.repeat(  # endless shuffled batches
        train_set.batches(args.batch_size, args.workers, device.type == "cuda", shuffle=shuffle)))
    model.train()
    tau = 0.0
    for it in range(args.iterations):
        images, labels = (x.to(device, non_blocking=True) for x in next(stream))
        images = clip_model.normalize(images)  # (B, 3, R, R)
        with autocast:
            img = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, E)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)   # (C, E)
        loss = contrastive_loss(img, txt, labels, model.logit_scale.exp(), earlier)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        cosine.step()
        if args.method == "codyra":  # Eq. 7: proximal step on every g, right after the optimizer
            tau = codyra.threshold_schedule(it, args.iterations, args.dense_ratio, args.kappa_max)
            codyra.proximal_step(model, tau)
        yield it, loss, tau
