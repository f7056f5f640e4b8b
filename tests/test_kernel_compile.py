"""The fused loss inside torch.compile: the ``pml_scale::partial_label_loss`` custom op.

CPU only: the op runs the kernel under the Triton interpreter (TRITON_INTERPRET=1, conftest.py)
or, with the interpreter off, the plain-torch fallback. References: the float64 loss written
literally (``ref_loss``) and the eager autograd Function (``FusedPartialLabelLoss``).
"""

from __future__ import annotations

import pytest
import torch

import pml_scale.kernels.partial_label as pl
from pml_scale.kernels import FusedPartialLabelLoss, fused_partial_label_loss
from pml_scale.kernels.library_op import fused_partial_label_loss_op, partial_label_loss_op
from test_kernel_partial_label import EPOCH, SEED, assert_yhat, make_inputs, ref_loss, rel_err

KW = dict(alpha=0.3, beta=0.7, d=1.3, q=0.5, seed=SEED, epoch=EPOCH)
# the op's flat arguments after the four tensors, in schema order
OP_DEFAULTS = dict(coef=None, alpha=0.3, beta=0.7, d=1.3, q=0.5, seed=SEED, epoch=EPOCH, p_threshold=0.1,
                   p_rule="text", num_rows=None, pseudo_weights="alpha_beta", neg_gamma=0.0, neg_margin=0.0,
                   need_grad=True)
# (name, changes): the paper's defaults, then the device-coef / printed-p / capped / ours+ / num_rows variant
OP_CASES = [("paper", {}),
            ("coef+options", dict(coef=torch.tensor([0.8, 0.2]), alpha=None, beta=None, p_rule="printed",
                                  p_threshold=0.5, num_rows=3.0, pseudo_weights="capped", neg_gamma=2.0,
                                  neg_margin=0.05)),
            ("no-grad", dict(need_grad=False))]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("PML_KERNEL_CONFIG", raising=False)
    pl.clear_caches()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def op_args(logits, states, pseudo, ids, **changes):
    kw = dict(OP_DEFAULTS, **changes)
    return (logits, states, pseudo, ids) + tuple(kw.values())


def use_interpreter(monkeypatch, on: bool) -> None:
    """The op reads TRITON_INTERPRET per call: "0" sends CPU tensors to the torch fallback."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if on else "0")


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreter", "torch-fallback"])
@pytest.mark.parametrize("name,changes", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck(monkeypatch, interpret, name, changes):
    """Schema, fake-tensor shapes/dtypes, autograd registration and AOT dispatch of the op."""
    use_interpreter(monkeypatch, interpret)
    logits, states, pseudo, ids = make_inputs(4, 100, gen_seed=3)
    args = op_args(logits.requires_grad_(changes.get("need_grad", True)), states, pseudo, ids, **changes)
    torch.library.opcheck(partial_label_loss_op, args)


@pytest.mark.parametrize("name,changes", OP_CASES[:2], ids=[c[0] for c in OP_CASES[:2]])
def test_torch_fallback_matches_the_kernel(monkeypatch, name, changes):
    """With the interpreter off, CPU calls take the torch fallback: same out, ŷ and gradient as the
    kernel (fp32; sentinel rows and the special rows of make_inputs included)."""
    logits, states, pseudo, ids = make_inputs(6, 300, gen_seed=5)
    states[5, ::3] = 7  # values outside {1, 0, -1} contribute nothing
    args = op_args(logits, states, pseudo, ids, **changes)
    use_interpreter(monkeypatch, True)
    k_out, k_yhat, k_grad = partial_label_loss_op(*args)
    use_interpreter(monkeypatch, False)
    t_out, t_yhat, t_grad = partial_label_loss_op(*args)
    assert rel_err(t_out, k_out) <= 1e-5 and rel_err(t_grad, k_grad) <= 1e-5
    assert torch.equal(t_out[6:12], k_out[6:12])  # p
    assert_yhat(t_yhat, logits)


def test_torch_fallback_matches_the_float64_reference(monkeypatch):
    use_interpreter(monkeypatch, False)
    logits, states, pseudo, ids = make_inputs(5, 200, gen_seed=8)
    x = logits.clone().requires_grad_(True)
    loss, yhat, p = fused_partial_label_loss_op(x, states, pseudo, ids, **KW)
    loss.backward()
    r_loss, r_grad, r_p, _ = ref_loss(logits, states, pseudo, ids, **KW)
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(x.grad, r_grad) <= 1e-5
    assert torch.equal(p.double(), r_p)
    assert_yhat(yhat, logits)


class Head(torch.nn.Module):
    """A linear layer, the fused loss, and a torch op after it: the loss between two torch ops."""

    def __init__(self, states, pseudo, ids, **kw):
        super().__init__()
        self.fc = torch.nn.Linear(16, states.shape[1])
        self.states, self.pseudo, self.ids, self.kw = states, pseudo, ids, kw

    def forward(self, feats):
        loss, yhat, p = fused_partial_label_loss(self.fc(feats), self.states, self.pseudo, self.ids, **self.kw)
        return 2.0 * loss + 0.0 * p.sum(), yhat


def make_head(B=8, L=120, gen_seed=0, loss_kw=KW):
    torch.manual_seed(gen_seed)
    _, states, pseudo, ids = make_inputs(B, L, gen_seed=gen_seed)
    return Head(states, pseudo, ids, **loss_kw), torch.randn(B, 16)


def test_no_graph_break():
    head, feats = make_head()
    ex = torch._dynamo.explain(head)(feats)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    assert "pml_scale.partial_label_loss" in ex.graphs[0].code  # the op is in the graph, not run around it


def eager_and_compiled(head, feats, backend):
    """(loss, ŷ, d loss / d fc.weight) of the eager module (autograd Function) and the compiled one."""
    outs = []
    for fn in (head, torch.compile(head, backend=backend, fullgraph=True)):
        head.zero_grad(set_to_none=True)
        loss, yhat = fn(feats)
        loss.backward()
        outs.append((loss.detach(), yhat, head.fc.weight.grad.clone()))
    return outs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("kw", [KW, dict(KW, coef=torch.tensor([0.6, 0.4]), alpha=None, beta=None,
                                         pseudo_weights="capped", neg_gamma=1.0, neg_margin=0.1)],
                         ids=["paper", "coef+ours+"])
def test_compiled_matches_eager(backend, kw):
    head, feats = make_head(gen_seed=1, loss_kw=kw)
    (e_loss, e_yhat, e_grad), (c_loss, c_yhat, c_grad) = eager_and_compiled(head, feats, backend)
    assert torch.equal(c_yhat, e_yhat) and not c_yhat.requires_grad
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_grad, e_grad, rtol=1e-6, atol=1e-9)
    assert e_grad.abs().max() > 0


@pytest.mark.slow
def test_compiled_matches_eager_inductor():
    """Inductor (C++ on CPU, ~1 min on a 2-core machine) around the opaque op: as in eager."""
    head, feats = make_head(gen_seed=2)
    (e_loss, _, e_grad), (c_loss, _, c_grad) = eager_and_compiled(head, feats, "inductor")
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_grad, e_grad, rtol=1e-5, atol=1e-8)


def test_op_backward_scales_by_the_upstream_gradient_and_refuses_double_backward():
    logits, states, pseudo, ids = make_inputs(4, 100, gen_seed=9)
    x = logits.clone().requires_grad_(True)
    loss, _, _ = fused_partial_label_loss_op(x, states, pseudo, ids, **KW)
    (g,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(-2.5), retain_graph=True)
    _, r_grad, _, _ = ref_loss(logits, states, pseudo, ids, **KW)
    assert rel_err(g, -2.5 * r_grad) <= 1e-5
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_eager_calls_still_take_the_autograd_function(monkeypatch):
    """Outside torch.compile the Function (in-place backward, no new B×L tensor) stays the path."""
    calls = []
    monkeypatch.setattr(FusedPartialLabelLoss, "apply", lambda *a: calls.append(a) or (None,) * 3)
    logits, states, pseudo, ids = make_inputs(2, 50)
    fused_partial_label_loss(logits, states, pseudo, ids, **KW)
    assert len(calls) == 1
