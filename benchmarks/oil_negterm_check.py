#!/usr/bin/env python
"""Issue 17: the paper loss CPU reference with one log-sigmoid pass (log(1 - yhat) = log yhat - x) vs two
(negative_term computes logsigmoid(-x) again): same loss, gradients within float rounding, time per
fwd+bwd at 64 x 9,605. The one-pass form is what pml_scale/losses/partial.py's loss_rows now does; the
two-pass form (the code before 2026-12-06) is written out here as the comparison.
    OMP_NUM_THREADS=1 python benchmarks/oil_negterm_check.py"""
import torch, time, sys, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from oil_components import states_like_native
import pml_scale.losses.partial as P
from pml_scale.losses.registry import LossInputs, build_loss
B, L = 64, 9605
g = torch.Generator().manual_seed(0)
states = states_like_native(B, L, g); ids = torch.arange(B) * 7; pseudo = torch.rand(B, L, generator=g)
x0 = torch.randn(B, L, generator=g) * 3
fn = build_loss("paper", validate=False)
counts = tuple(P.alpha_beta_counts("observed", states).tolist())
def two_passes(s):
    log_p = F.logsigmoid(s.x)
    log_n = P.negative_term(s.x, s.neg_gamma, s.neg_margin)  # logsigmoid(-x): the second pass
    zero = torch.zeros((), dtype=s.x.dtype)
    a_obs = torch.where(s.pos, log_p, zero).sum(1); b_obs = torch.where(s.neg, log_n, zero).sum(1)
    a_pick = torch.where(s.picked, s.pseudo * log_p, zero).sum(1); b_pick = torch.where(s.picked, (1 - s.pseudo) * log_n, zero).sum(1)
    obs = s.inv_ne * (s.alpha * a_obs + s.beta * b_obs); pick = s.d * s.inv_ns * (s.alpha_s * a_pick + s.beta_s * b_pick)
    return -s.p * (obs + pick)
orig_rows, rows_fix = two_passes, P.loss_rows
def run(x):
    return fn(LossInputs(logits=x, states=states, sample_ids=ids, epoch=1, total_epochs=4, pseudo=pseudo, batch_counts=counts)).loss
def step():
    x = x0.clone().requires_grad_(True); l = run(x); l.backward(); return l, x.grad
P.loss_rows = orig_rows; l1, g1 = step()
P.loss_rows = rows_fix; l2, g2 = step()
print("loss", l1.item(), l2.item(), "rel", abs(l1.item()-l2.item())/abs(l1.item()), "grad max abs diff", (g1-g2).abs().max().item(), "grad max", g1.abs().max().item())
def t(n=15):
    for _ in range(3): step()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); step(); ts.append(time.perf_counter()-s)
    return round(1e3*sorted(ts)[n//2],1)
for r in range(3):
    P.loss_rows = orig_rows; a = t()
    P.loss_rows = rows_fix; b = t()
    print(f"paper loss fwd+bwd at 64x9605, 1 thread: reference {a} ms, one log-sigmoid pass {b} ms")
