"""The generated ops inside a model, trained with autograd and torch.compile:
parameter gradients match the same model built from torch ops, and training
lowers the loss."""
import pytest
import torch
import torch.nn.functional as F

from generated import attention, softmax
from generated import max as pmax


class Tiny(torch.nn.Module):
    def __init__(self, ours: bool, d: int = 16, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, classes)
        self.ours = ours

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.ours:
            h = attention(q, k, v, causal=True)
            pooled = pmax(h, dim=1)                      # max over the sequence
            return softmax(self.out(pooled), dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.softmax(self.out(h.amax(dim=1)), dim=-1)


def nll(probs, target):
    return -torch.log(probs.gather(1, target[:, None])).mean()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradients_match_torch_and_training_lowers_the_loss(compiled, device):
    torch._dynamo.reset()
    x = torch.randn(4, 12, 16, device=device, dtype=torch.float64)
    target = torch.randint(0, 5, (4,), device=device)
    ours, ref = Tiny(True).to(device, torch.float64), Tiny(False).to(device, torch.float64)
    ref.load_state_dict(ours.state_dict())
    step = torch.compile(lambda m, a, t: nll(m(a), t), fullgraph=True, backend="aot_eager") if compiled \
        else (lambda m, a, t: nll(m(a), t))
    loss = step(ours, x, target)
    loss.backward()
    nll(ref(x), target).backward()
    for (name, p), r in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        loss = step(ours, x, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
