"""Closed-form FLOPs of AdaMix training and inference on a Hugging Face backbone, frozen-aware.

Only matrix products are counted (2 FLOPs per multiply-add), as ``FlopCounterMode`` does; bias adds,
activations, softmax, LayerNorm and the consistency loss's KL are elementwise and left out.

The backward of a product ``Y = A @ B`` costs one forward's worth of FLOPs for each operand that
requires a gradient (``dA = dY @ B.T``, ``dB = A.T @ dY``). With a frozen backbone this gives the
accounting of parameter-efficient training (litgpt's ``estimate_flops``): a frozen weight costs 2x its
forward (forward + input gradient), a trained adapter weight 3x, and an activation-by-activation
product (attention scores) 1x plus 1x per operand that carries a gradient. Everything upstream of the
first trained parameter carries no gradient at all (the embeddings are frozen), so the first layer's
frozen products cost 1x: counting them 2x, as a plain "frozen = 2x" rule does, overstates a step.

The number of experts ``M`` appears nowhere below: a routed pass runs one expert per projection, and
merging leaves one ordinary adapter. That is the paper's cost claim, written as code; the benchmark
``benchmarks/flops.py`` checks it against two independent counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from adamix_ds.config import AdaMixConfig

__all__ = ["FlopEstimate", "estimate_flops"]

ENCODERS = ("bert", "roberta", "deberta-v2")


@dataclass(frozen=True)
class FlopEstimate:
    """Per-token FLOPs of one batch.

    Attributes:
        forward: one forward pass; the routed training forward and the merged inference forward run the
            same products, so this is both.
        routed_step: forward + backward of one routed training pass.
        consistency_step: a full training step: with the consistency loss on, one forward + backward over
            the batch stacked twice (two routed passes), else one routed pass. The KL between the passes is
            elementwise (``O(classes)`` per row) and not counted.
        tokens: ``batch_size * seq_len``, the divisor of the totals.
    """

    forward: float
    routed_step: float
    consistency_step: float
    tokens: int


class _Ledger:
    """Running forward and forward+backward totals of the products of one pass."""

    def __init__(self) -> None:
        self.forward = 0
        self.train = 0

    def product(self, flops: int, grad_operands: int) -> None:
        """A product of ``flops`` forward FLOPs whose backward computes ``grad_operands`` gradients."""
        self.forward += flops
        self.train += flops * (1 + grad_operands)

    def frozen(self, flops: int, input_grad: bool) -> None:
        """A frozen weight applied to an input that does (or does not) carry a gradient."""
        self.product(flops, int(input_grad))

    def trained(self, flops: int, input_grad: bool) -> None:
        """A trained weight: its gradient is always computed, the input's only when it carries one."""
        self.product(flops, 1 + int(input_grad))


def _lora(ledger: _Ledger, rows: int, d_in: int, rank: int, out_lengths: list[int], input_grad: bool) -> None:
    """``B A x`` on ``rows`` rows: ``A`` stacks one rank-``r`` block per adapted output range."""
    ledger.trained(2 * rows * d_in * rank * len(out_lengths), input_grad)
    for length in out_lengths:
        ledger.trained(2 * rows * rank * length, True)  # B's input is A x, which carries A's gradient


def _bottleneck(ledger: _Ledger, rows: int, d: int, rank: int, input_grad: bool) -> None:
    ledger.trained(2 * rows * d * rank, input_grad)
    ledger.trained(2 * rows * rank * d, True)


def _relative_attention(
    ledger: _Ledger,
    config: PretrainedConfig,
    batch: int,
    seq: int,
    d: int,
    lora_rank: int | None,
    q_grad: bool,
    k_grad: bool,
    passes: int = 1,
) -> bool:
    """DeBERTa-v2's disentangled terms; returns whether they carry a gradient into the scores.

    The relative embeddings (``2 * span`` rows, frozen) are projected once per layer and batch, by the
    layer's own query/key projections when ``share_att_key`` (LoRA included), else by separate frozen ones.
    With LoRA on the shared projections, ``passes`` stacked passes project them once each, with their own experts.
    """
    types = config.pos_att_type or []
    types = types.split("|") if isinstance(types, str) else types
    span = config.position_buckets if config.position_buckets > 0 else config.max_relative_positions
    if span < 1:
        span = config.max_position_embeddings
    rows = 2 * span
    pos_q_grad = pos_k_grad = False
    if config.share_att_key:
        for _ in range(passes if lora_rank is not None else 1):
            ledger.frozen(2 * rows * d * d, False)  # query_proj(rel)
            if lora_rank is not None:
                _lora(ledger, rows, d, lora_rank, [d], False)
                pos_q_grad = True
            ledger.frozen(2 * rows * d * d, False)  # key_proj(rel)
    else:
        for kind in ("c2p", "p2c"):
            if kind in types:
                ledger.frozen(2 * rows * d * d, False)
    carries = False
    if "c2p" in types:
        ledger.product(2 * batch * seq * rows * d, int(q_grad) + int(pos_k_grad))
        carries |= q_grad or pos_k_grad
    if "p2c" in types:
        ledger.product(2 * batch * seq * rows * d, int(k_grad) + int(pos_q_grad))
        carries |= k_grad or pos_q_grad
    return carries


def estimate_flops(model_config: PretrainedConfig, adamix_config: AdaMixConfig, batch_size: int, seq_len: int) -> FlopEstimate:
    """Per-token FLOPs of AdaMix (any ``num_experts``) or the equivalent single adapter on a backbone.

    Supports the built-in placements of ``adamix_ds.model``: BERT, RoBERTa and DeBERTa-v2 with a sequence
    classification head (``model_config.num_labels`` classes; DeBERTa's pooler trained with the head),
    GPT-2 as a causal LM (frozen tied LM head). Attention is counted as the eager (math) implementation:
    full ``L x L`` score and value products, causal masking applied after the product.

    The consistency step is what ``adamix_loss`` runs: one pass over the batch stacked twice. Every
    per-token product doubles; products made once per forward (DeBERTa-v2's projections of its relative
    position embeddings) do not, so there the step costs less than two routed passes (except with LoRA on
    its shared query/key projections: each pass then projects the positions with its own experts).
    """
    arch = model_config.model_type
    if arch not in (*ENCODERS, "gpt2"):
        raise ValueError(f"model_type={arch!r} has no closed form: allowed {', '.join((*ENCODERS, 'gpt2'))}")
    if adamix_config.target_modules is not None:
        raise ValueError("estimate_flops covers the built-in placement only: target_modules must be None")
    tokens = batch_size * seq_len
    routed = _pass(model_config, adamix_config, batch_size, seq_len)
    consistency = adamix_config.consistency_weight > 0 and (arch == "gpt2" or model_config.num_labels > 1)
    step = _pass(model_config, adamix_config, 2 * batch_size, seq_len, passes=2) if consistency else routed
    return FlopEstimate(
        forward=routed.forward / tokens,
        routed_step=routed.train / tokens,
        consistency_step=step.train / tokens,
        tokens=tokens,
    )


def _pass(model_config: PretrainedConfig, adamix_config: AdaMixConfig, batch: int, seq: int, passes: int = 1) -> _Ledger:
    """The products of one training forward + backward over ``batch`` sequences of ``seq`` tokens, ``passes``
    routed passes stacked in it (one expert per projection and pass)."""
    arch = model_config.model_type
    rank = adamix_config.bottleneck_dim
    tokens = batch * seq
    lora = adamix_config.adapter_type == "lora"
    if arch == "gpt2":
        d, layers = model_config.n_embd, model_config.n_layer
        ffn = model_config.n_inner or 4 * d
    else:
        d, layers, ffn = model_config.hidden_size, model_config.num_hidden_layers, model_config.intermediate_size
    ledger = _Ledger()
    live = False  # does the residual stream carry a gradient yet? Not before the first adapter.
    for layer in range(layers):
        if arch == "gpt2":
            ledger.frozen(2 * tokens * d * 3 * d, live)  # fused c_attn
            if lora:  # query and value thirds: A is [2r, d], B two [d, r] blocks
                _lora(ledger, tokens, d, rank, [d, d], live)
            # q, k and v are slices of one output: all carry a gradient once any part of it does.
            q_grad = k_grad = v_grad = live or lora
        else:
            for _ in range(3):
                ledger.frozen(2 * tokens * d * d, live)
            if lora:
                for _ in range(2):  # query and value
                    _lora(ledger, tokens, d, rank, [d], live)
            q_grad, k_grad, v_grad = live or lora, live, live or lora
        ledger.product(2 * batch * seq * seq * d, int(q_grad) + int(k_grad))  # Q K^T over all heads
        probs_grad = q_grad or k_grad
        if arch == "deberta-v2" and model_config.relative_attention:
            probs_grad |= _relative_attention(ledger, model_config, batch, seq, d, rank if lora else None, q_grad, k_grad, passes)
        ledger.product(2 * batch * seq * seq * d, int(probs_grad) + int(v_grad))  # softmax(.) V
        context_grad = probs_grad or v_grad
        ledger.frozen(2 * tokens * d * d, context_grad)  # attention output projection
        live = live or context_grad
        ledger.frozen(2 * tokens * d * ffn, live)
        ledger.frozen(2 * tokens * ffn * d, live)
        if not lora:
            _bottleneck(ledger, tokens, d, rank, live)
            live = True
        if layer == 0 and arch == "deberta-v2" and getattr(model_config, "conv_kernel_size", 0) > 0:
            # ConvLayer on the embedding output (no gradient), added to layer 0's output.
            groups = getattr(model_config, "conv_groups", 1)
            ledger.frozen(2 * tokens * d * d * model_config.conv_kernel_size // groups, False)
    classes = model_config.num_labels
    if arch == "gpt2":
        ledger.frozen(2 * tokens * d * model_config.vocab_size, live)  # tied LM head, every position
    elif arch == "bert":
        ledger.frozen(2 * batch * d * d, live)  # pretrained pooler on [CLS], frozen
        ledger.trained(2 * batch * d * classes, live)
    else:  # RoBERTa's head (dense + out_proj) and DeBERTa's fresh pooler + classifier are trained
        ledger.trained(2 * batch * d * d, live)
        ledger.trained(2 * batch * d * classes, True)
    return ledger
