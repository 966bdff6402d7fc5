"""A/B: AdamW foreach vs fused on CPU over ~64M float32 parameters (SmolLM2-like shapes), alternated.

    python benchmarks/optimizer_ab.py
"""
import time

import torch

torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(n)) for n in [28_000_000] + [600_000] * 60]
for p in ps:
    p.grad = torch.randn_like(p)
opts = {k: torch.optim.AdamW(ps, lr=1e-3, **kw)
        for k, kw in (("foreach", dict(foreach=True)), ("fused", dict(fused=True)))}
for _k, o in opts.items():
    o.step()
for r in range(3):
    for k, o in opts.items():
        t = time.perf_counter()
        o.step()
        print(r, k, round(time.perf_counter() - t, 3))
# equivalence
a = [torch.nn.Parameter(torch.randn(1000)) for _ in range(3)]
b = [torch.nn.Parameter(x.detach().clone()) for x in a]
oa = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, foreach=True)
ob = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
for _s in range(5):
    g = [torch.randn(1000) for _ in range(3)]
    for x, y, gg in zip(a, b, g):
        x.grad = gg.clone()
        y.grad = gg.clone()
    oa.step()
    ob.step()
print(max((x - y).abs().max().item() for x, y in zip(a, b)))
