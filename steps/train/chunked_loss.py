"""The causal-LM loss without the full logits tensor.

transformers computes batch x seq x vocab logits and upcasts them to fp32 for the loss: at the
recipe's shape (8 x 512 x 49,953) that is 818 MB in fp32, plus as much again for their gradient,
and lm_head is trained in full here, so they cannot be skipped. With `loss_chunk_size` set, the
model's forward returns the loss computed `loss_chunk_size` supervised tokens at a time: each
chunk's logits are made, reduced to a summed cross-entropy and dropped, and made again in the
backward pass (activation checkpointing of lm_head + loss per chunk), so at most one chunk's
logits exist at once. Same loss as transformers' (mean over the tokens whose label is not -100,
labels shifted by one), same gradients, up to float summation order.

The forward of the causal LM inside the peft model is replaced, not the training loop: DDP and
FSDP still call their wrapped module's forward, so gradient synchronisation is unchanged.
"""
from __future__ import annotations

import types

IGNORE_INDEX = -100


def chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size: int):
    """Mean cross-entropy of lm_head(hidden[:, t]) against labels[:, t + 1] over the labels that
    are not IGNORE_INDEX, `chunk_size` tokens of logits at a time."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    n = y.numel()
    if n == 0:   # no supervised token: a zero that still reaches every parameter's graph
        return hidden.sum() * 0.0

    def chunk_loss(hc, yc):
        return F.cross_entropy(lm_head(hc).float(), yc, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk_size):
        total = total + checkpoint(chunk_loss, h[s:s + chunk_size], y[s:s + chunk_size],
                                   use_reentrant=False)
    return total / n


def use_chunked_loss(model, chunk_size: int) -> None:
    """Make `model` (a peft model, or a causal LM) compute its loss with chunked_causal_lm_loss
    whenever labels are given; without labels it is the model's own forward (logits)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = lm.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return own(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs = {k: v for k, v in kwargs.items()
                  if v is not None and k not in ("return_dict", "num_items_in_batch",
                                                 "output_attentions", "output_hidden_states")}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = chunked_causal_lm_loss(out.last_hidden_state, self.lm_head, labels, chunk_size)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = types.MethodType(forward, lm)
