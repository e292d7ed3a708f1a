"""The chunked LM head + loss: the same loss and gradients as the full-logits path, without the full logits."""

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import read_metrics, train_losses, write_config

import train
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.loss import lm_loss

SHAPES = [  # (tokens, hidden, vocabulary, chunk)
    (64, 16, 50, 8), (65, 16, 50, 8), (37, 8, 1000, 5), (10, 4, 7, 1), (12, 4, 7, 100),
]


@pytest.mark.parametrize("tokens, hidden, vocab, chunk", SHAPES)
def test_loss_and_gradients_equal_the_full_logits(tokens, hidden, vocab, chunk):
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (tokens,))
    reference = F.cross_entropy(h @ w.T, targets)  # the full logits, an independent path
    grads_ref = torch.autograd.grad(reference * 3.0, (h, w))
    chunked = lm_loss(h, w, targets, chunk)
    grads = torch.autograd.grad(chunked * 3.0, (h, w))  # an upstream gradient other than 1
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    h = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(5, (9,))
    assert torch.autograd.gradcheck(lambda a, b: lm_loss(a, b, targets, 4), (h, w))


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_every_parameter_gradient(tied):
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=97, num_layers=2, hidden_size=16, num_attention_heads=2,
                          max_position_embeddings=12, tie_embeddings=tied)).double()
    tokens = torch.randint(97, (3, 12))
    logits, _ = model(tokens[:, :-1])
    full = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    chunked, _ = model(tokens[:, :-1], tokens[:, 1:], loss_chunk_tokens=7)
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-12)
    for got, want in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for backward during fn(): the memory the loss holds until backward."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def test_saved_memory_is_the_inputs_not_the_logits():
    tokens, hidden, vocab = 2048, 64, 8192
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    targets = torch.randint(vocab, (tokens,))
    full = saved_bytes(lambda: F.cross_entropy((h @ w.T).float(), targets))
    chunked = saved_bytes(lambda: lm_loss(h, w, targets, 256))
    logits_bytes = tokens * vocab * 4
    assert full >= logits_bytes  # the full path keeps the logits (and their log-softmax) for backward
    assert chunked < 0.1 * logits_bytes  # the chunked one keeps h, w, targets and one float per token


def test_training_with_chunks_gives_the_same_losses(tmp_path, data_prefix):
    settings = dict(train_iters=4, log_interval=1, eval_interval=0, checkpoint_factor=100, pos_emb="rotary",
                    hidden_dropout=0.0, attention_dropout=0.0)
    train.run([str(write_config(tmp_path / "full", data_prefix, **settings))])
    train.run([str(write_config(tmp_path / "chunked", data_prefix, loss_chunk_tokens=40, **settings))])
    full = train_losses(read_metrics(tmp_path / "full" / "logs"))
    chunked = train_losses(read_metrics(tmp_path / "chunked" / "logs"))
    assert full.keys() == chunked.keys()
    for step in full:
        assert chunked[step] == pytest.approx(full[step], rel=1e-4)


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every matrix product run while it is active."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.dtypes.append(args[-2].dtype)
        return func(*args, **(kwargs or {}))


def test_backward_under_bf16_autocast_runs_in_bf16_like_the_full_logits_path():
    """The chunked backward recomputes logits as the forward made them (bf16 GEMMs under autocast), so its
    GEMMs are bf16 and its gradients those of the full-logits path under the same autocast."""
    torch.manual_seed(3)
    h = torch.randn(96, 64, requires_grad=True)
    w = (torch.randn(300, 64) * 0.3).requires_grad_(True)
    targets = torch.randint(300, (96,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = lm_loss(h, w, targets, 0)
        chunked = lm_loss(h, w, targets, 32)
    full_grads = torch.autograd.grad(full, (h, w))
    recorder = MatmulDtypes()
    with recorder:
        chunked_grads = torch.autograd.grad(chunked, (h, w))
    assert recorder.dtypes and set(recorder.dtypes) == {torch.bfloat16}, recorder.dtypes
    assert chunked.item() == pytest.approx(full.item(), rel=1e-3)
    for got, want in zip(chunked_grads, full_grads):
        assert got.dtype == torch.float32  # the parameters' and inputs' own dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
