# Cross-checks a Rampart WRN exported with `rampart export` against PyTorch on the same
# pixels (`rampart data export ... --out test.npz`): a WideResNet with RobustBench's
# parameter names is built here, loads the state dict strictly, and reports clean
# accuracy on the first N images and PGD-20 (L-inf 8/255, step 2/255, one uniform
# start, cross-entropy) robust accuracy on the first M; it also writes the model back
# as a torch.save file and as ONNX (legacy exporter, opset 13) for `rampart import`
# and `rampart eval --model x.onnx`. See docs/interop.md.
#
# usage: python pytorch_check.py MODEL.safetensors TEST.npz N M OUT_DIR
import json, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
torch.set_num_threads(2)

class Block(nn.Module):
    # Pre-activation basic block with RobustBench's parameter names.
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin); self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout); self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
    def forward(self, x):
        o = F.relu(self.bn1(x))
        skip = x if self.equal else self.convShortcut(o)
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + skip

class Stage(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])
    def forward(self, x): return self.layer(x)

class WRN(nn.Module):
    def __init__(self, depth, k, classes):
        super().__init__()
        n = (depth - 4) // 6; ch = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = Stage(n, ch[0], ch[1], 1); self.block2 = Stage(n, ch[1], ch[2], 2); self.block3 = Stage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3]); self.fc = nn.Linear(ch[3], classes); self.nch = ch[3]
    def forward(self, x):
        o = self.block3(self.block2(self.block1(self.conv1(x))))
        o = F.relu(self.bn1(o))
        return self.fc(F.avg_pool2d(o, 8).view(-1, self.nch))

class Normalised(nn.Module):
    def __init__(self, net, mean, std):
        super().__init__(); self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1)); self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
    def forward(self, x): return self.net((x - self.mean) / self.std)

def pgd(model, x, y, eps, alpha, steps, seed):
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():
        return model(x + delta).argmax(1)

path, npz, n_clean, n_robust, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
meta = safe_open(path, "pt").metadata()
_, d, k = meta["rampart.arch"].split("-")
net = WRN(int(d), int(k), int(meta["rampart.num_classes"]))
net.load_state_dict(load_file(path))  # strict
model = Normalised(net, json.loads(meta["rampart.mean"]), json.loads(meta["rampart.std"])).eval()
data = np.load(npz)
x = torch.tensor(data["images"][:n_clean], dtype=torch.float32) / 255.0
y = torch.tensor(data["labels"][:n_clean], dtype=torch.int64)
with torch.no_grad():
    pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, n_clean, 250)])
clean = (pred == y).float().mean().item()
t = time.time()
rob = torch.cat([pgd(model, x[i:i + 100], y[i:i + 100], 8 / 255, 2 / 255, 20, i) for i in range(0, n_robust, 100)])
robust = (rob == y[:n_robust]).float().mean().item()
torch.save(net.state_dict(), out + "/from-pytorch.pt")
torch.onnx.export(model, torch.rand(1, 3, 32, 32), out + "/from-pytorch.onnx", opset_version=13,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
json.dump({"clean_accuracy": clean, "n_clean": n_clean, "pgd20_accuracy": robust, "n_robust": n_robust,
           "predicted": pred.tolist(), "pgd_seconds": time.time() - t, "torch": torch.__version__}, open(out + "/pytorch.json", "w"))
print(json.dumps({"clean_accuracy": clean, "pgd20_accuracy": robust, "torch": torch.__version__}))
