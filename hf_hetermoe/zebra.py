"""Zebra parallelism (paper, Theorem 1): stripes of a micro-batch zigzag between attention and expert ranks.

Forward. The micro-batch the Trainer hands to the base model is split on the batch axis into R contiguous
stripes. Each stripe runs the *stock* base-model forward in its own thread; a baton passed round-robin lets
one stripe compute at a time. At each routed-experts call a stripe issues its dispatch asynchronously, passes
the baton on, and resumes (baton back, combine done) for the layer above. So attention runs
A(l,1) A(l,2) .. A(l,R) A(l+1,1) .., the next stripe's attention overlaps the expert work of the previous one,
and expert servers see E(l,1) .. E(l,R) E(l+1,1) .. (they follow the leader's commands in that order).

Cuts. Hooks detach each decoder layer's input (`h_in`, a leaf) and the experts' results (`y_leaf`); the
gathered rows `x_PH` stay attached. Every (layer, stripe) segment is therefore its own autograd graph, from
`h_in` to the layer output `out`, with `y_leaf` as an extra leaf and `x_PH` as an extra output.

Backward. The stripes' outputs (and router logits, for the aux loss) leave the base model through one autograd
Function, `ZebraJoin`, so the stock `loss.backward()` reaches its backward, which walks the segments in
Theorem-1 order: layer by layer downwards, stripes in order. Per segment, two stages:
  stage 1: dy = d out / d y_leaf (an `autograd.grad` that touches only the path from `out` to `y_leaf`),
           sent to the expert servers at once (asynchronously);
  stage 2: once dx is back, one `autograd.backward` over [out, router logits, x_PH] with [g, g_logits, dx]:
           attention and router gradients, and `h_in.grad`, the g of the layer below.
Stage 2 of layer l is followed right away by stage 1 of layer l-1 for the same stripe, so its dy leaves
before the next stripe's work. A layer's attention gradients are all-reduced as soon as all stripes are done.

Deviation from Theorem 1, on purpose: the head and loss run once over the whole micro-batch (the stock
Trainer computes one loss and calls backward on it), so the top stage's forwards of all stripes precede its
backwards instead of alternating per stripe.

Legend: R stripes, B batch rows, T tokens, P (token, k) pairs, H hidden.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .engine import _in_backward
from .schedule_order import segmented_backward_order
from .streams import StripeStreams
from .transport import PendingExchange
from .zebra_run import Baton, ZebraRun, _Aborted, _autocast_state, _local, active_stripe, exchange_in_stripe

if TYPE_CHECKING:
    from .engine import HeterMoEEngine


class ZebraJoin(torch.autograd.Function):
    """forward: the stripes' last hidden states and per-layer router logits, concatenated in batch order (stock
    order), as fresh tensors. backward: the segmented Theorem-1 backward; returns the input embeddings' grad.
    Only `embeds` (and an anchor) are tensor inputs: the segments live in ctx, so the outer engine never walks
    into graphs the segmented backward frees itself."""

    @staticmethod
    def forward(ctx, embeds: torch.Tensor, anchor: torch.Tensor, run: ZebraRun):
        ctx.run = run
        stripes = [j for j in range(run.num_stripes) if run.results[j] is not None]  # stripes with rows
        hidden = torch.cat([run.hidden(j).detach() for j in stripes])
        logits = []
        if run.logits(stripes[0]) is not None:
            for i in range(len(run.logits(stripes[0]))):
                logits.append(torch.cat([run.logits(j)[i].detach() for j in stripes]))
        return (hidden, *logits)

    @staticmethod
    def backward(ctx, g_hidden, *g_logits):
        run = ctx.run
        ctx.run = None
        g_embeds = run.runner.backward(run, g_hidden, list(g_logits))
        return g_embeds, None, None


class ZebraRunner:
    """Replaces the base model's forward on attention ranks when zebra parallelism applies."""

    def __init__(self, *, base_model: nn.Module, engine: "HeterMoEEngine", microbatches: int,
                 moe_layers: tuple[int, ...]):
        self.base = base_model
        self.engine = engine
        self.num_stripes = microbatches
        self.layers = list(base_model.layers)
        self.layer_index = {id(m): i for i, m in enumerate(self.layers)}
        self.moe_index = {layer: i for i, layer in enumerate(sorted(moe_layers))}
        self.original_forward = base_model.forward
        self._handles: list[Any] = []
        self.streams = StripeStreams(engine.groups.device, microbatches)  # one CUDA stream per stripe

    # ---- installation ---------------------------------------------------------------------------------------
    def install(self) -> None:
        for module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._layer_input_hook, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._layer_output_hook, with_kwargs=True))
        self.base.forward = self.forward

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.base.__dict__.pop("forward", None)

    def _layer_input_hook(self, module, args, kwargs):
        ctx = active_stripe()
        if ctx is None or _in_backward():
            return None  # not zebra, or a checkpointed layer being recomputed (graph already cut)
        run, stripe = ctx
        seg = run.segment(self.layer_index[id(module)], stripe)
        if args:
            seg.h_src = args[0]
        else:
            seg.h_src = kwargs["hidden_states"]
        seg.h_in = seg.h_src.detach().requires_grad_(seg.h_src.requires_grad)
        if args:
            return (seg.h_in, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": seg.h_in}

    def _layer_output_hook(self, module, args, kwargs, output):
        ctx = active_stripe()
        if ctx is None or _in_backward():
            return None
        run, stripe = ctx
        run.segment(self.layer_index[id(module)], stripe).out = output[0] if isinstance(output, tuple) else output
        return None

    # ---- forward ----------------------------------------------------------------------------------------------
    def _applies(self, args: tuple, kwargs: dict) -> bool:
        if not self.engine.has_servers or args:
            return False
        if not (self.base.training and torch.is_grad_enabled()) or torch.is_inference_mode_enabled():
            return False
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            return False
        config = self.base.config
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(config, flag, False)):
                return False
        tensor = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        return tensor is not None

    def forward(self, *args, **kwargs):
        if not self._applies(args, kwargs):
            return self.original_forward(*args, **kwargs)
        _refuse_reentrant_checkpointing(self.layers[0])
        engine = self.engine
        session = engine.begin_session()
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self.base.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        bounds = torch.tensor_split(torch.arange(batch), self.num_stripes)
        rows = [(int(b[0]), int(b[-1]) + 1) if len(b) else (0, 0) for b in bounds]
        run = ZebraRun(runner=self, session=session, rows=rows, baton=Baton(len(rows)))
        run.inputs = [None] * len(rows)
        run.results = [None] * len(rows)
        kwargs["use_cache"] = False
        state = (torch.is_grad_enabled(), _autocast_state(embeds.device.type))
        self.streams.begin()
        threads = [
            threading.Thread(target=self._stripe_main, args=(run, j, embeds, kwargs, state), daemon=True,
                             name=f"hetermoe-zebra-stripe{j}")
            for j in range(len(rows))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if run.error is not None:
            raise run.error
        self.streams.join([t for o in run.results if o is not None for t in _output_tensors(o)])
        anchor = torch.zeros((), requires_grad=True)  # makes the join's outputs require grad in any case
        results = ZebraJoin.apply(embeds, anchor, run)
        hidden, logits = results[0], tuple(results[1:])
        template = next(o for o in run.results if o is not None)
        fields = {"last_hidden_state": hidden}
        if logits:
            fields["router_logits"] = logits
        return type(template)(**fields)

    def _stripe_main(self, run: ZebraRun, stripe: int, embeds: torch.Tensor, kwargs: dict, state) -> None:
        grad_enabled, (autocast_on, autocast_dtype) = state
        device_type = embeds.device.type
        _local.ctx = (run, stripe)
        try:
            reads = (embeds, *(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
            with self.streams.stripe(stripe, reads), torch.set_grad_enabled(grad_enabled), \
                    torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                run.baton.acquire(stripe)
                _local.task_start = self.engine.instruments.now()
                start, stop = run.rows[stripe]
                if stop > start:
                    x = embeds[start:stop].detach().requires_grad_(embeds.requires_grad)
                    run.inputs[stripe] = x
                    run.results[stripe] = self.original_forward(
                        inputs_embeds=x, **_slice_batch(kwargs, start, stop, embeds.shape[0]))
                else:
                    self._empty_stripe_forward(run, stripe)
                # The top stage (after the last exchange) is not padded under emulation: num_seqs=0.
                self.engine.instruments.attention_done("F", len(self.layers), stripe, _local.task_start, num_seqs=0)
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the main thread, which re-raises it
            run.error = run.error or exc
            run.baton.fail()
        finally:
            _local.ctx = None
            run.baton.finish(stripe)

    def _empty_stripe_forward(self, run: ZebraRun, stripe: int) -> None:
        """A stripe with no rows (batch smaller than R) still takes part in every exchange, with zero rows."""
        hidden = self.base.config.hidden_size
        for layer in sorted(self.moe_index):
            # Requires grad like any stripe's rows, so its (empty) backward exchange is announced and kept too.
            x = torch.zeros(0, hidden, device=self.engine.groups.device, dtype=self.base.dtype, requires_grad=True)
            counts = torch.zeros(self.engine.placement.num_experts, dtype=torch.int64)
            exchange_in_stripe(self.engine, layer, x, counts)

    # ---- backward ---------------------------------------------------------------------------------------------
    def backward(self, run: ZebraRun, g_hidden: torch.Tensor | None, g_logits: list) -> torch.Tensor | None:
        """Walk the segments in the one encoded Theorem-1 order (schedule_order.segmented_backward_order)."""
        engine = self.engine
        instruments = engine.instruments
        top, last_stripe = len(self.layers) - 1, run.num_stripes - 1
        g_seg: list[torch.Tensor | None] = [self._rows_of(g_hidden, run, j) for j in range(run.num_stripes)]
        pending: dict[tuple[int, int], PendingExchange | None] = {}
        start = instruments.now()
        for step in segmented_backward_order(len(self.layers), run.num_stripes):
            layer, j = step.layer, step.stripe
            if step.stage == 1:
                out = run.hidden(j) if layer == top else run.segment(layer, j).out
                pending[(layer, j)] = self._stage1(run, layer, j, out, g_seg[j])
                if layer == top:  # the top stage's backward of this stripe ends with its dy (unpadded)
                    instruments.attention_done("B", top, j, start, num_seqs=0)
                    start = instruments.now()
                if j == last_stripe:
                    engine.finish_layer(layer)  # every stripe's dy of this layer left: held experts, combines
                    if layer < top:
                        self._reduce_layer_gradients(layer + 1)
                continue
            exchange = pending.pop((layer, j), None)
            dx = exchange.wait() if exchange is not None else None  # waiting is not attention work
            start = instruments.now()
            out = run.hidden(j) if layer == top else run.segment(layer, j).out
            g_seg[j] = self._stage2(run, layer, j, out, g_seg[j], g_logits, dx)
            # The task ends where this stripe's output gradients for the layer below leave.
            instruments.attention_done("B", layer - 1, j, start, num_seqs=run.rows[j][1] - run.rows[j][0])
            if layer == 0 and j == last_stripe:
                self._reduce_layer_gradients(0)
        grads = [run.inputs[j].grad if run.inputs[j] is not None else None for j in range(run.num_stripes)]
        present = [g for g in grads if g is not None]
        if not present:
            return None
        return torch.cat(present)

    def _reduce_layer_gradients(self, layer: int) -> None:
        """Every stripe's backward through `layer` is done: start averaging its gradients over attention ranks
        (the top layer brings the head, final norm and other non-layer parameters but the embeddings)."""
        params = list(self.layers[layer].parameters())
        if layer == len(self.layers) - 1:
            params += [p for n, p in self.base.named_parameters() if not n.startswith("layers.")
                       and not n.startswith(_embedding_prefix(self.base))]
        self.engine.reduce_gradients_async(params)

    @staticmethod
    def _rows_of(g: torch.Tensor | None, run: ZebraRun, stripe: int) -> torch.Tensor | None:
        start, stop = run.rows[stripe]
        if stop == start:
            return None
        if g is None:
            return torch.zeros_like(run.hidden(stripe))
        return g[start:stop]

    def _stage1(self, run: ZebraRun, layer: int, stripe: int, out, g) -> PendingExchange | None:
        """dy of this segment's experts, sent to the expert servers at once."""
        if layer not in self.moe_index:
            return None
        ex = run.segment(layer, stripe).exchange  # every stripe exchanged in forward, empty ones with zero rows
        _local.ctx = (run, stripe)
        try:
            if ex.y_leaf.shape[0] and ex.y_leaf.requires_grad:
                (dy,) = torch.autograd.grad([out], [ex.y_leaf], [g], retain_graph=True, allow_unused=True)
            else:
                dy = None
        finally:
            _local.ctx = None
        if dy is None:
            dy = torch.zeros_like(ex.y_leaf)
        return self.engine.issue_backward(ex.key, ex.plan, dy)

    def _stage2(self, run: ZebraRun, layer: int, stripe: int, out, g, g_logits: list, dx) -> torch.Tensor | None:
        """The rest of the segment's backward, once dx is back; returns the gradient of its input."""
        seg = run.segments.get((layer, stripe))
        if seg is None or out is None or g is None:
            return None
        tensors, grads = [out], [g]
        moe = self.moe_index.get(layer)
        logits = run.logits(stripe)
        if moe is not None and logits is not None and moe < len(g_logits) and g_logits[moe] is not None:
            start, stop = run.rows[stripe]
            per_row = logits[moe].shape[0] // (stop - start)
            tensors.append(logits[moe])
            grads.append(g_logits[moe][start * per_row : stop * per_row])
        if seg.exchange is not None and dx is not None and seg.exchange.x_PH.shape[0] and seg.exchange.x_PH.requires_grad:
            tensors.append(seg.exchange.x_PH)
            grads.append(dx.to(seg.exchange.x_PH.dtype))
        _local.ctx = (run, stripe)
        try:
            torch.autograd.backward(tensors, grads)
        finally:
            _local.ctx = None
        if seg.h_in is None or seg.h_in.grad is None:
            return None
        if layer > 0 and seg.h_src is not run.segment(layer - 1, stripe).out:
            # Something sits between the layer below and this one in the stock loop: go through it.
            (g_below,) = torch.autograd.grad([seg.h_src], [run.segment(layer - 1, stripe).out], [seg.h_in.grad])
            return g_below
        if layer == 0 and seg.h_src is not run.inputs[stripe] and seg.h_src.requires_grad:
            torch.autograd.backward([seg.h_src], [seg.h_in.grad])  # from the embeddings to the first layer
        elif layer == 0 and run.inputs[stripe] is not None:
            run.inputs[stripe].grad = seg.h_in.grad
        return seg.h_in.grad


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a stripe's base-model output (last hidden state, router logits)."""
    tensors = [output.last_hidden_state]
    tensors += [t for t in (getattr(output, "router_logits", None) or ()) if isinstance(t, torch.Tensor)]
    return tensors


def _slice_batch(kwargs: dict, start: int, stop: int, batch: int) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch and key in (
            "attention_mask", "position_ids", "token_type_ids", "cache_position"
        ):
            value = value[start:stop]
        out[key] = value
    return out


def _embedding_prefix(base: nn.Module) -> str:
    embeddings = base.get_input_embeddings()
    for name, module in base.named_modules():
        if module is embeddings:
            return name
    return "embed_tokens"


def _refuse_reentrant_checkpointing(layer: nn.Module) -> None:
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if getattr(layer, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
        raise ValueError(
            "hetermoe: zebra parallelism needs non-reentrant activation checkpointing; pass "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
        )

