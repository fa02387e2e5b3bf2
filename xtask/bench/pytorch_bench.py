"""The network of `rampart bench`, timed in PyTorch, for `cargo xtask bench --compare-pytorch`.

Same architecture as built by rampart-models: the pre-activation WRN-d-k (16-channel
stem, three stages, 1x1 shortcut on the pre-activated input, BN-ReLU, global average
pool, linear) or CCAT's post-activation ResNet-20 (64/128/256 channels, 1x1
convolution + BatchNorm shortcuts); normalisation inside the model. `--variant`
gives the seeds' variants of the WRN: `student` (after every BatchNorm, noise
α·σ·z with σ the per-channel standard deviation of the batch in training and its
running estimate in evaluation, α = 0.1 learnable) and `oat` (dual BatchNorm routed
per example by λ = 0 / λ > 0, FiLM from a 128-d λ code through a 2C-2C MLP;
evaluated at λ = 1, trained on a batch cycling through the six published λ values).
Same batch, same steps (forward, pgd-step, train-step, and the methods' whole
training steps fast-at-step and pgd-at-step), same timing rule (warm-up, then the
median of the timed repetitions). Prints one JSON object per line with the fields of `rampart
bench --json` plus "framework": "pytorch". Optional tooling: Rampart itself never
needs Python.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


LAMBDAS = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]
CODE_DIM = 128


class Condition:
    """The λ of every example of the current batch and their codes, shared by the layers."""
    lambdas = None
    codes = None


class Norm(nn.Module):
    """BatchNorm with the variant's extras, before the ReLU (as rampart-models' Norm)."""

    def __init__(self, c, variant, cond):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.variant, self.cond = variant, cond
        if variant == "student":
            self.alpha = nn.Parameter(torch.tensor(0.1))
            self.register_buffer("running_std", torch.ones(c))
        if variant == "oat":
            self.adv = nn.BatchNorm2d(c)
            self.film = nn.Sequential(nn.Linear(CODE_DIM, 2 * c), nn.ReLU(), nn.Linear(2 * c, 2 * c))
            nn.init.zeros_(self.film[2].weight)
            nn.init.zeros_(self.film[2].bias)

    def forward(self, x):
        if self.variant == "oat":
            lam = self.cond.lambdas
            clean, adv = (lam == 0).nonzero().flatten(), (lam != 0).nonzero().flatten()
            if len(adv) == 0:
                h = self.bn(x)
            elif len(clean) == 0:
                h = self.adv(x)
            else:
                h = torch.empty_like(x)
                h[clean] = self.bn(x[clean])
                h[adv] = self.adv(x[adv])
            gamma, beta = self.film(self.cond.codes).chunk(2, dim=1)
            return h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        h = self.bn(x)
        if self.variant == "student":
            if self.training:
                sigma = (h.detach().var(dim=(0, 2, 3), unbiased=False) + 1e-5).sqrt()
                self.running_std.mul_(0.9).add_(0.1 * sigma)
            else:
                sigma = self.running_std
            h = h + self.alpha * sigma[None, :, None, None] * torch.randn_like(h)
        return h


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.bn1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        h = F.relu(self.bn2(self.conv1(pre)))
        return self.conv2(h) + skip


class PreActNet(nn.Module):
    """The pre-activation network of rampart-models' `preact_net`: a 3×3 stem, stages of
    `per_stage` pre-activation blocks (the first of each later stage with stride 2),
    BN-ReLU, average pool, linear. WRN-d-k: stem 16, widths 16k, 32k, 64k, (d − 4)/6
    blocks per stage; PreActResNet-18: stem 64, widths 64, 128, 256, 512, 2 per stage."""

    def __init__(self, stem, widths, per_stage, classes=10, variant="plain"):
        super().__init__()
        self.cond = Condition()
        self.register_buffer("codes", torch.linalg.qr(torch.randn(CODE_DIM, len(LAMBDAS)))[0].T.contiguous())
        norm = lambda c: Norm(c, variant, self.cond)
        n = per_stage
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        blocks, c_in = [], stem
        for s, c_out in enumerate(widths):
            for b in range(n):
                blocks.append(Block(c_in, c_out, 2 if (b == 0 and s > 0) else 1, norm))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm(c_in)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x, lambdas=None):
        if lambdas is not None:
            # The training values only (no interpolation needed for the benchmark).
            self.cond.lambdas = lambdas
            self.cond.codes = self.codes[torch.bucketize(lambdas, torch.tensor(LAMBDAS, device=lambdas.device))]
        h = self.blocks(self.stem((x - self.mean) / self.std))
        h = F.relu(self.bn(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class BasicBlock(nn.Module):
    """The post-activation block of CCAT's ResNet-20: conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet20(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(64)
        blocks, c_in = [], 64
        for s, c_out in enumerate([64, 128, 256]):
            for b in range(3):
                blocks.append(BasicBlock(c_in, c_out, 2 if (b == 0 and s > 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x, lambdas=None):
        h = F.relu(self.stem_bn(self.stem((x - self.mean) / self.std)))
        h = self.blocks(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def median_seconds(fn, reps, warmup, sync, gpu):
    """The median seconds per call of `fn` until the device finished it, and the
    host's share of it (the median time until `fn` returned, having queued its work,
    over that median; as `rampart bench`'s `host_share`)."""
    # At least `warmup` calls, and on a GPU at least half a second of them (as
    # `rampart bench`): a GPU leaves its idle clocks only under sustained load.
    start, done = time.perf_counter(), 0
    while done < warmup or (gpu and time.perf_counter() - start < 0.5):
        fn()
        sync()
        done += 1
    times, hosts = [], []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t)
        sync()
        times.append(time.perf_counter() - t)
    wall = statistics.median(times)
    return wall, min(statistics.median(hosts) / wall, 1.0) if wall > 0 else 1.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="wrn-16-4")
    p.add_argument("--variant", default="plain", choices=["plain", "student", "oat"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", default="forward,pgd-step,train-step")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N], with +tf32 to allow TF32 or +bf16 for bf16 autocast "
                        "(as `rampart bench`)")
    args = p.parse_args()
    name, precision = args.device, "f32"
    for suffix in ("+tf32", "+bf16"):
        if name.endswith(suffix):
            name, precision = name[:-len(suffix)], suffix[1:]
    tf32 = precision == "tf32"
    dev = torch.device(name)
    # The precision of `rampart bench --device` on the same string: full f32 unless
    # +tf32 (PyTorch's own default allows TF32 in cuDNN convolutions); +bf16 runs the
    # steps under torch.autocast(dtype=torch.bfloat16) (f32 weights and optimiser,
    # bf16 convolutions), otherwise in full f32.
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    # PyTorch at its fastest: cuDNN times its algorithms once per geometry (`rampart
    # bench` takes cuDNN's heuristic choice, cached per geometry).
    torch.backends.cudnn.benchmark = True
    if args.arch == "resnet20":
        if args.variant != "plain":
            raise SystemExit("the variants are built on the pre-activation networks only here")
        model = ResNet20().to(dev)
    elif args.arch == "preact-resnet18":
        model = PreActNet(64, [64, 128, 256, 512], 2, variant=args.variant).to(dev)
    else:
        _, depth, widen = args.arch.split("-")
        widen = int(widen)
        model = PreActNet(16, [16 * widen, 32 * widen, 64 * widen], (int(depth) - 4) // 6,
                          variant=args.variant).to(dev)
    x = torch.rand(args.batch_size, 3, 32, 32).to(dev)
    y = (torch.arange(args.batch_size) % 10).to(dev)
    oat = args.variant == "oat"
    # Evaluation at λ = 1; training on a batch cycling through the λ values.
    eval_lambdas = torch.ones(args.batch_size, device=dev) if oat else None
    train_lambdas = torch.tensor(LAMBDAS, device=dev).repeat(args.batch_size // len(LAMBDAS) + 1)[:args.batch_size] if oat else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def forward():
        model.eval()
        with torch.no_grad(), autocast():
            model(x, eval_lambdas)

    def pgd_step():
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        xv = x.clone().requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(xv, eval_lambdas), y, reduction="sum")
        torch.autograd.grad(loss, xv)
        for q in model.parameters():
            q.requires_grad_(True)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x, train_lambdas), y)
        loss.backward()
        opt.step()

    # The methods' whole training steps, as `rampart bench --steps fast-at-step,pgd-at-step`
    # takes them from its presets: the attack in eval mode on the frozen network from a
    # uniform start in the ε-ball (through the box), the last iterate; then the training
    # pass on it, SGD with momentum 0.9 (no Nesterov), weight decay 5e-4.
    method_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def adversarial_step(eps, alpha, steps):
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        xa = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(xa), y, reduction="sum")
            g, = torch.autograd.grad(loss, xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        for q in model.parameters():
            q.requires_grad_(True)
        model.train()
        method_opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(xa), y)
        loss.backward()
        method_opt.step()

    def fast_at_step():
        # Wong et al.: FGSM with step 10/255 at ε = 8/255.
        adversarial_step(8 / 255, 10 / 255, 1)

    def pgd_at_step():
        # PGD-10 with step 0.007 at ε = 0.03 (the `at-wrn28-10` preset).
        adversarial_step(0.03, 0.007, 10)

    fns = {"forward": forward, "pgd-step": pgd_step, "train-step": train_step,
           "fast-at-step": fast_at_step, "pgd-at-step": pgd_at_step}
    for step in args.steps.split(","):
        if step in ("fast-at-step", "pgd-at-step") and oat:
            raise SystemExit(f"{step} times plain and student models (as `rampart bench`)")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        s, host_share = median_seconds(fns[step], args.reps, args.warmup, sync, dev.type == "cuda")
        # The most memory the step's tensors held at once, as `rampart bench` reports it.
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        print(json.dumps({
            "framework": "pytorch", "torch_version": torch.__version__, "step": step,
            "arch": args.arch, "variant": args.variant, "batch_size": args.batch_size, "device": args.device,
            "seconds_per_batch": s, "images_per_second": args.batch_size / s,
            "reps": args.reps, "threads": torch.get_num_threads(),
            "tf32_conv": dev.type == "cuda" and torch.backends.cudnn.allow_tf32,
            "tf32_matmul": dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
            "autocast": "bf16" if precision == "bf16" else None,
            **({"peak_memory_bytes": peak} if peak is not None else {}),
            **({"host_share": host_share} if dev.type == "cuda" else {}),
        }), flush=True)


if __name__ == "__main__":
    main()
