"""pscnn vs PyTorch (CPU, float64): the same weights give the same numbers.

Weight layouts: conv weights (out, in, kh, kw) are PyTorch's; pscnn's dense
weight is (in, out), so ``torch.nn.Linear.weight = fc.weight.T``.  Flatten
emits (C, H, W) order like ``torch.nn.Flatten`` on NCHW, so ``fc1.weight``
needs no permutation.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from cnn_core import PRESETS, build_model, softmax_cross_entropy  # noqa: E402
from cnn_core.layers import ELU, BatchNorm2D, Conv2D, LeakyReLU, MaxPool2D, ReLU, SiLU  # noqa: E402
from pscnn.bench.torch_reference import torch_model  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True)
def _torch_double_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)          # determinism, and no oversubscription next to numpy
    yield
    torch.set_num_threads(old)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def torch_seed_model(model, dropout_p=0.25):
    """The "seed" preset in torch (float64), with ``model``'s weights; and its weighted modules by name."""
    net = torch_model(torch, model.spec, dropout=dropout_p, copy_weights_from=model, dtype=torch.float64)
    mods = {layer.name: mod for layer, mod in zip(model.layers, net) if layer.parameters}
    return net, mods


def seed_model_and_batch(dropout_p=0.25, n=6):
    spec = copy.deepcopy(PRESETS["seed"])
    for layer in spec["layers"]:
        if layer["type"] == "dropout":
            layer["p"] = dropout_p
    model = build_model(spec, seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    for k, v in model.params.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
    x = rng.standard_normal((n, 1, 28, 28))
    y = rng.integers(0, 10, n)
    return model, x, y


def test_seed_model_eval_logits_match_torch():
    model, x, _ = seed_model_and_batch()              # dropout 0.25: identity in eval mode on both
    net, _ = torch_seed_model(model)
    net.eval()
    with torch.no_grad():
        ref = net(t(x)).numpy()
    out = model.forward(x, train=False)
    assert rel_err(out, ref) < TOL


def test_seed_model_train_gradients_match_torch():
    model, x, y = seed_model_and_batch(dropout_p=0.0)
    net, mods = torch_seed_model(model, dropout_p=0.0)
    net.train()
    loss_t = F.cross_entropy(net(t(x)), t(y))
    loss_t.backward()
    loss, d = softmax_cross_entropy(model.forward(x, train=True), y)
    grads = model.backward(d)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for name, mod in mods.items():
        gw = mod.weight.grad.numpy()
        if name.startswith("fc"):
            gw = gw.T
        assert rel_err(grads[f"{name}.weight"], gw) < TOL, name
        assert rel_err(grads[f"{name}.bias"], mod.bias.grad.numpy()) < TOL, name


@pytest.mark.parametrize("hw,c_in,c_out,kernel,stride,padding", [
    ((9, 7), 3, 4, 3, 2, 2),
    ((9, 7), 2, 3, (3, 2), 2, 2),
    ((8, 11), 2, 3, (2, 3), (2, 1), (1, 2)),
    ((7, 7), 1, 2, 5, 3, 0),
])
def test_conv2d_matches_torch(hw, c_in, c_out, kernel, stride, padding):
    rng = np.random.default_rng(2)
    layer = Conv2D(c_out, kernel, stride, padding)
    layer.build((*hw, c_in), np, np.float64, rng)
    layer.parameters["bias"][...] = rng.standard_normal(c_out)
    w, b = layer.parameters["weight"], layer.parameters["bias"]
    x = rng.standard_normal((3, c_in, *hw))                     # NCHW

    xt = t(x).requires_grad_(True)
    wt, bt = t(w).requires_grad_(True), t(b).requires_grad_(True)
    ref = F.conv2d(xt, wt, bt, stride=stride, padding=padding)
    out, cache = layer.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert out.transpose(0, 3, 1, 2).shape == tuple(ref.shape)
    assert rel_err(out.transpose(0, 3, 1, 2), ref.detach().numpy()) < TOL

    dout = rng.standard_normal(tuple(ref.shape))
    ref.backward(t(dout))
    dx, grads = layer.backward(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)), cache)
    assert rel_err(dx.transpose(0, 3, 1, 2), xt.grad.numpy()) < TOL
    assert rel_err(grads["weight"], wt.grad.numpy()) < TOL
    assert rel_err(grads["bias"], bt.grad.numpy()) < TOL


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 3)])
def test_maxpool_ties_match_torch(k, s):
    """Integer inputs with many ties: gradients routed to the same (first) maximum as torch's CPU kernel."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, 3, 8, 9)).astype(np.float64)
    layer = MaxPool2D(k, s)
    layer.build((8, 9, 3), np, np.float64, rng)
    xt = t(x).requires_grad_(True)
    ref = F.max_pool2d(xt, k, s)
    out, cache = layer.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(out.transpose(0, 3, 1, 2), ref.detach().numpy())
    dout = rng.standard_normal(tuple(ref.shape))
    ref.backward(t(dout))
    dx, _ = layer.backward(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)), cache)
    # overlapping windows sum their gradients in another order than torch: allow rounding only
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), xt.grad.numpy(), rtol=1e-14, atol=1e-15)
    assert np.array_equal(dx.transpose(0, 3, 1, 2) != 0, xt.grad.numpy() != 0)


def test_batchnorm_train_and_eval_match_torch():
    rng = np.random.default_rng(4)
    c = 3
    layer = BatchNorm2D(momentum=0.1, eps=1e-5)
    layer.build((5, 4, c), np, np.float64, rng)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    layer.parameters["weight"][...] = gamma
    layer.parameters["bias"][...] = beta
    bn = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(t(gamma))
        bn.bias.copy_(t(beta))
    bn.train()

    for step in range(3):                                     # running stats accumulate over steps
        x = rng.standard_normal((4, c, 5, 4)) * (step + 1) + step
        xt = t(x).requires_grad_(True)
        ref = bn(xt)
        out, cache = layer.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), train=True)
        assert rel_err(out.transpose(0, 3, 1, 2), ref.detach().numpy()) < TOL, step
        np.testing.assert_allclose(layer.state["running_mean"], bn.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.state["running_var"], bn.running_var.numpy(), rtol=1e-12)

        dout = rng.standard_normal(x.shape)
        bn.weight.grad = bn.bias.grad = None
        ref.backward(t(dout))
        dx, grads = layer.backward(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)), cache)
        assert rel_err(dx.transpose(0, 3, 1, 2), xt.grad.numpy()) < 1e-9, step
        assert rel_err(grads["weight"], bn.weight.grad.numpy()) < TOL
        assert rel_err(grads["bias"], bn.bias.grad.numpy()) < TOL

    bn.eval()
    x = rng.standard_normal((2, c, 5, 4))
    with torch.no_grad():
        ref = bn(t(x)).numpy()
    out, _ = layer.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), train=False)
    assert rel_err(out.transpose(0, 3, 1, 2), ref) < TOL


@pytest.mark.parametrize("layer,theirs", [
    (LeakyReLU(0.1), lambda z: F.leaky_relu(z, 0.1)),
    (ELU(0.7), lambda z: F.elu(z, 0.7)),
    (SiLU(), F.silu),
    (ReLU(), F.relu),
], ids=["leaky_relu", "elu", "silu", "relu"])
def test_activations_match_torch(layer, theirs):
    rng = np.random.default_rng(6)
    layer.build((5, 4, 2), np, np.float64, rng)
    x = rng.standard_normal((3, 5, 4, 2)) * 3
    xt = t(x).requires_grad_(True)
    ref = theirs(xt)
    out, cache = layer.forward(x)
    assert rel_err(out, ref.detach().numpy()) < 1e-14
    dout = rng.standard_normal(x.shape)
    ref.backward(t(dout))
    dx, _ = layer.backward(dout, cache)
    assert rel_err(dx, xt.grad.numpy()) < 1e-14
