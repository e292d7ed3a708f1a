"""Our GPT checkpoints as an lm-evaluation-harness model, with no Hugging Face export in between.

Shape legend: B rows in a batch, S tokens, V vocabulary.

`MegatronLM` answers lm-eval's three requests on our model directly (any family, dense, MoE or StructMoE):
`loglikelihood` (multiple choice, LAMBADA-style tasks), `loglikelihood_rolling` (perplexity tasks) and
`generate_until` (generation tasks, with the KV cache). It follows the semantics of lm-eval's `HFLM`, so a
checkpoint scores what its export (tools/convert_to_hf.py) scores under HFLM (tests/integration/
test_lm_eval.py checks every document to 1e-4):

- text is tokenized with the run's tokenizer as the data was (no BOS added); an empty context is the
  end-of-document token, which is also the prefix of every rolling window (the export's bos_token);
- a context and continuation longer than the model's max_position_embeddings + 1 lose tokens on the left;
- log-probabilities are over the whole (padded) vocabulary, as the training loss is;
- generation is greedy unless a task asks to sample, stops at the end-of-document token, at a stop string
  or after max_gen_toks tokens, and the text is cut before the first stop string.

Rows of a batch are right-padded for scoring (a causal model's real positions never see the padding) and
left-padded with an attention mask for generation. With moe_token_dropping the experts' capacity depends on
the batch, so scores depend on the batch size, as they do in training and under HFLM.

Several processes (torchrun) each hold the whole model and score a share of the requests: lm-eval shards the
documents by `rank` and `world_size` and gathers the metrics on rank 0 (tools/eval_tasks.py sets them).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.config import ConfigError
from megatron.data.tokenizer import Tokenizer, tokenizer_of
from megatron.evaluation.lm_eval_tasks import lm_eval_module
from megatron.model.attention import KVCache
from megatron.model.generation import next_token, pad_batch
from megatron.model.gpt import GPT
from megatron.model.moe.dispatcher import LSHDispatcher
from megatron.model.moe.layer import MoELayer

lm_eval_model = lm_eval_module("lm_eval.api.model")
log = logging.getLogger(__name__)

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def drop_lsh(model: torch.nn.Module) -> list[tuple[MoELayer, LSHDispatcher]]:
    """LSH compression off in every MoE layer (each keeps the exchange the compression wrapped); returns what
    was replaced. Evaluation measures the model, not the training-time approximation of its exchange."""
    swapped = [(layer, layer.dispatcher) for layer in model.modules()
               if isinstance(layer, MoELayer) and isinstance(layer.dispatcher, LSHDispatcher)]
    for layer, dispatcher in swapped:
        layer.dispatcher = dispatcher.inner
    return swapped


@contextlib.contextmanager
def exact_moe_exchange(model: torch.nn.Module) -> Iterator[None]:
    """LSH compression off while inside (evaluation during training), back on the way out."""
    swapped = drop_lsh(model)
    try:
        yield
    finally:
        for layer, dispatcher in swapped:
            layer.dispatcher = dispatcher


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input, targets) windows that predict every token of `tokens` exactly once, the first after `prefix`:
    the targets are the last len(targets) positions' next tokens, and each window but the first has a full
    `max_length` of input, as lm-eval's rolling windows do."""
    stream = [prefix, *tokens]  # tokens[j] is predicted from stream[: j + 1]
    windows = []
    for start in range(0, len(tokens), max_length):
        stop = min(start + max_length, len(tokens))
        windows.append((stream[max(0, stop - max_length):stop], tokens[start:stop]))
    return windows


class MegatronLM(lm_eval_model.TemplateLM):
    """lm-eval's model interface on our GPT: build it from a checkpoint (`from_checkpoint`) or from the
    model a training run holds (the evaluation in the training loop)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16, max_gen_toks: int = 256,
                 max_length: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 1234):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        self.model = model
        self.text_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._max_length = max_length or model.cfg.max_position_embeddings
        self._rank, self._world_size = rank, world_size
        self._device = next(model.parameters()).device
        self.generator = torch.Generator(device=self._device).manual_seed(seed)  # sampling tasks only
        self.checkpoint: Path | None = None  # the folder read, when built by from_checkpoint

    @classmethod
    def from_checkpoint(cls, load: str | Path, overrides: list[str] | tuple[str, ...] = (),
                        device: str | None = None, dtype: torch.dtype = torch.float32, **kwargs) -> MegatronLM:
        """A save folder (its `latest`) or a global_stepN folder, whole on one process (megatron/training/
        pretrained.py), in eval mode and with LSH compression off."""
        from megatron.training.pretrained import load_pretrained  # the training layer, only for this path

        args, model, path = load_pretrained(load, overrides)
        if args.model_type != "gpt":
            raise ConfigError(f"{path}: model_type {args.model_type}: lm-eval evaluates language models")
        drop_lsh(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = cls(model.to(device=device, dtype=dtype).eval(), tokenizer_of(args), **kwargs)
        lm.checkpoint = path
        return lm

    # what lm-eval's TemplateLM asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.text_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    # several processes: lm-eval shards the documents and gathers the metrics through these
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # the requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per (strings, context tokens,
        continuation tokens) request; the context is cut on the left to fit max_length."""
        rows = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens (expected 1 to "
                                 f"max_length {self.max_length})")
            rows.append(((context + continuation)[-(self.max_length + 1):][:-1], continuation))
        return self.score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-probability, every token predicted once in max_length windows."""
        rows, owners = [], []
        for index, request in enumerate(requests):
            for window in rolling_windows(self.tok_encode(request.args[0]), self.prefix_token_id, self.max_length):
                rows.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self.score(rows)):
            totals[index] += logprob
        return totals

    @torch.no_grad()
    def score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability, all greedy) of each row's targets, which the last len(targets) positions
        of its input predict. Rows with the same input share one forward (multiple choice with one-token
        answers); the longest run first, batch_size at a time, right-padded."""
        inputs = sorted({tuple(tokens) for tokens, _ in rows}, key=lambda tokens: (-len(tokens), tokens))
        logits_of: dict[tuple[int, ...], torch.Tensor] = {}
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        by_input: dict[tuple[int, ...], list[int]] = {}
        for i, (tokens, _) in enumerate(rows):
            by_input.setdefault(tuple(tokens), []).append(i)
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            tokens_BS, _ = pad_batch([list(t) for t in batch], side="right")
            logits_BSV, _ = self.model(tokens_BS.to(self._device))
            for b, tokens in enumerate(batch):
                logits_of[tokens] = logits_BSV[b, :len(tokens)]
            for tokens in batch:
                for i in by_input[tokens]:
                    targets = rows[i][1]
                    logits_TV = logits_of[tokens][len(tokens) - len(targets):].float()
                    targets_T = torch.as_tensor(targets, device=self._device)
                    logprobs_T = F.log_softmax(logits_TV, dim=-1).gather(-1, targets_T[:, None]).squeeze(-1)
                    results[i] = (float(logprobs_T.sum()), bool((logits_TV.argmax(-1) == targets_T).all()))
                del logits_of[tokens]
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued until a stop string, the end-of-document token or max_gen_toks tokens; the
        text before the first stop string. Requests with the same generation settings run as batches."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            settings = self.generation_settings(requests[indices[0]].args[1])
            contexts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))  # similar lengths together: less padding
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                texts = self.generate([contexts[i] for i in batch], **settings)
                for i, text in zip(batch, texts):
                    results[i] = text
        return results

    def generation_settings(self, gen_kwargs: dict) -> dict:
        """A task's generation_kwargs as `generate`'s arguments; settings we do not implement are named once."""
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            log.warning("generate_until: ignoring generation_kwargs %s (supported: %s)", unknown, sorted(GEN_KWARGS))
        until = gen_kwargs.get("until") or []
        temperature = float(gen_kwargs.get("temperature", 0.0))
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        return {"stops": [until] if isinstance(until, str) else list(until),
                "max_new_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": temperature if sample else 0.0,
                "top_k": int(gen_kwargs.get("top_k") or 0), "top_p": float(gen_kwargs.get("top_p") or 1.0)}

    def generate(self, contexts: list[list[int]], stops: list[str], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0) -> list[str]:
        """One batch: contexts cut on the left to max_length - max_new_tokens, left-padded, the prompt run once
        and then each new token alone against the KV cache, until every row has stopped."""
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ValueError(f"generate_until: max_gen_toks {max_new_tokens} leaves no room for a context in "
                             f"max_length {self.max_length}")
        prompt_BS, mask_BS = pad_batch([context[-room:] or [self.prefix_token_id] for context in contexts])
        prompt_BS, mask_BS = prompt_BS.to(self._device), mask_BS.to(self._device)
        cache = KVCache(len(self.model.blocks))
        vocab = self.text_tokenizer.vocab_size
        new_BS, rows = prompt_BS, [[] for _ in contexts]
        stopped = [False] * len(contexts)
        for step in range(max_new_tokens):
            if step > 0:
                mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(contexts), 1)], dim=1)
            logits_BSV, _ = self.model(new_BS, cache=cache, attention_mask_BT=mask_BS)
            logits_BV = logits_BSV[:, -1].float()
            logits_BV[:, vocab:] = float("-inf")  # the embedding's padding rows are no tokens
            next_B = next_token(logits_BV, temperature, top_k, top_p, self.generator)
            for b, token in enumerate(next_B.tolist()):
                if stopped[b]:
                    continue
                if token == self.eot_token_id:
                    stopped[b] = True
                    continue
                rows[b].append(token)
                stopped[b] = any(stop and stop in self.tok_decode(rows[b]) for stop in stops)
            if all(stopped):
                break
            new_BS = next_B[:, None]
        return [cut_at_stops(self.tok_decode(row), stops) for row in rows]


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first of the stop strings it contains."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
